"""Command line: bad input gives one line on stderr, exit code 2, no traceback, nothing written."""
from types import SimpleNamespace

import pytest
import torch

import cifar
from conftest import run_cli, write_folder

pytestmark = pytest.mark.slow  # most tests here run cifar.py in a subprocess


def assert_one_line_error(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "0"], "--epochs"),  # an untrained model has zero residual BN weights: QAT divides by them
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "1"], "batch norm trains on 2 images a batch at the least"),
    (["--qat-epochs", "-2"], "--qat-epochs"),
    (["--qat-batches", "-1"], "--qat-batches"),
    (["--lr", "0"], "--lr"),
    (["--crop-padding", "-1"], "--crop-padding"),
    (["--cutout", "33"], "--cutout"),
    (["--model", "vgg16"], "invalid choice"),
    (["--epochs", "ten"], "invalid int"),
    (["--bench-batch-sizes", "0"], "--bench-batch-sizes"),
    (["--weight-bits", "5"], "--weight-bits"),
    (["--deploy-runtimes", "tensorrt"], "--deploy-runtimes"),
    (["--time-budget", "30", "--epochs", "3"], "give either it or --epochs"),
    (["--time-budget", "30", "--float-checkpoint", "fp32.pt"], "give either it or --float-checkpoint"),
    (["--time-budget", "0"], "--time-budget"),
    (["--flow", "pt2e", "--weight-bits", "4"], "--weight-bits 4 is for --flow eager"),
    (["--flow", "fx"], "invalid choice"),
])
def test_bad_values(args, fragment, tmp_path, capsys):
    """In this process (the checks are argparse's; test_cuda_without_cuda takes the same path through cifar.py)."""
    with pytest.raises(SystemExit) as exit_:
        cifar.cli([*args, "--out-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "none")])
    proc = SimpleNamespace(returncode=exit_.value.code, stderr=capsys.readouterr().err)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path):
    assert_one_line_error(run_cli("--device", "cuda", "--out-dir", tmp_path / "out"), "CUDA is not available")


def test_missing_data_offline_is_one_clear_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("--data-dir", empty, "--out-dir", tmp_path / "out", timeout=120)
    assert_one_line_error(proc, str(empty), "cifar-10-batches-py", "train/<class>", "--data-dir", "CIFAR10_DIR")
    assert proc.stdout.strip() == ""  # the one line is all the user sees
    assert not (tmp_path / "out").exists() and list(empty.iterdir()) == []


def test_missing_data_dir_is_not_left_behind(tmp_path):
    proc = run_cli("--data-dir", tmp_path / "nowhere", "--out-dir", tmp_path / "out", timeout=120)
    assert_one_line_error(proc, "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_data_dir_of_another_layout(tmp_path):
    (tmp_path / "other" / "images").mkdir(parents=True)
    assert_one_line_error(run_cli("--data-dir", tmp_path / "other", "--out-dir", tmp_path / "out"),
                          "neither CIFAR-10 layout")


def test_missing_class_folder_through_the_cli(tmp_path):
    root = write_folder(tmp_path / "cifar", per_class=1)
    for split in ("train", "test"):
        for p in (root / split / "ship").iterdir():
            p.unlink()
        (root / split / "ship").rmdir()
    proc = run_cli("--data-dir", root, "--out-dir", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert_one_line_error(proc, "missing: ['ship']")


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("keep me")
    assert_one_line_error(run_cli("--out-dir", tmp_path / "file"), "is a file")
    assert (tmp_path / "file").read_text() == "keep me"


def test_help_shows_defaults():
    text = " ".join(cifar.get_args_parser().format_help().split())
    per_model = lambda key: ", ".join(f"{v[key]} for {k}" for k, v in cifar.DEFAULTS.items())
    assert f"default: {per_model('epochs')}" in text and f"default: {per_model('batch_size')}" in text
    assert "(default: 50)" in text and "(default: save_models)" in text


def test_per_model_defaults_fill_in():
    args = cifar.parse_args(["--model", "resnet18"])
    assert args.epochs == cifar.DEFAULTS["resnet18"]["epochs"] and args.qat_lr == args.lr / 100
    assert args.batch_size == cifar.DEFAULTS["resnet18"]["batch_size"]
    assert cifar.parse_args(["--model", "resnet18", "--batch-size", "7"]).batch_size == 7


def test_data_dir_with_only_hidden_files_still_tries_the_download(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / ".gitkeep").write_text("")
    proc = run_cli("--data-dir", data, "--out-dir", tmp_path / "out", timeout=120)
    assert_one_line_error(proc, "download failed")
    assert [p.name for p in data.iterdir()] == [".gitkeep"]


def test_a_time_budget_below_one_epoch_names_the_minimum(data_dir, tmp_path):
    """The pace is measured on the data, then the run stops before training: nothing written."""
    proc = run_cli("--time-budget", "0.05", "--data-dir", data_dir, "--cache-dir", tmp_path / "cache",
                   "--out-dir", tmp_path / "out", timeout=300)
    assert_one_line_error(proc, "--time-budget 0.05 is too small here", "minutes")
    assert not (tmp_path / "out").exists()


def test_too_few_training_images_is_one_line_before_training(data_dir, tmp_path):
    proc = run_cli("--train-subset", 1, "--data-dir", data_dir, "--out-dir", tmp_path / "out")
    assert_one_line_error(proc, "1 training image cannot train", "use --train-subset 2 or more")
    assert proc.stdout == "" and not (tmp_path / "out").exists()
