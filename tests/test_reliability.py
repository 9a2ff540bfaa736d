"""Crash and Ctrl-C recovery, stage reuse, atomic files, safe loading, clear errors that change nothing."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import utils
from conftest import ROOT, run_cli, write_folder

pytestmark = pytest.mark.slow  # most tests here run cifar.py in a subprocess

# The deploy stage verifies and times one runtime here: the smoke runs of test_pipeline cover all of them.
QUICK = ["--model", "resnet18", "--epochs", "3", "--qat-epochs", "1", "--batch-size", "50", "--lr", "0.02",
         "--no-ptq", "--deploy-runtimes", "onnxruntime", "--bench-runs", "2", "--bench-warmup", "0",
         "--bench-batch-sizes", "1"]


def snapshot(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def same_state(a, b):
    sa, sb = (torch.load(p, weights_only=True) for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """An uninterrupted quick run."""
    out = tmp_path_factory.mktemp("finished")
    proc = run_cli(*QUICK, "--data-dir", data_dir, "--out-dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "resnet18"


def start(data_dir, out, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # SIGINT at its default, as in a terminal: a test run started as a background job inherits it ignored
    return subprocess.Popen([sys.executable, str(ROOT / "cifar.py"), *QUICK, "--data-dir", str(data_dir),
                             "--out-dir", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_epoch(proc, out, epoch, timeout=300):
    """Wait until checkpoint.pt holds at least this float epoch."""
    ckpt = out / "resnet18" / "checkpoint.pt"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["epoch"] >= epoch:
            return
        time.sleep(0.2)
    pytest.fail("the run never reached the epoch")


def test_kill_9_then_resume_gives_the_uninterrupted_weights(data_dir, finished, tmp_path):
    proc = start(data_dir, tmp_path)
    wait_for_epoch(proc, tmp_path, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "resnet18" / "fp32.pt").exists()
    with utils.exclusive_folder(tmp_path / "resnet18"):  # the OS released the killed run's lock
        pass
    resumed = run_cli(*QUICK, "--data-dir", data_dir, "--out-dir", tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "fp32 epoch 1/3" not in resumed.stdout
    assert same_state(tmp_path / "resnet18" / "fp32.pt", finished / "fp32.pt")
    assert same_state(tmp_path / "resnet18" / "qat.pt", finished / "qat.pt")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm_keep_the_checkpoint_and_resume_to_the_same_weights(data_dir, finished, tmp_path,
                                                                               sig, code, word):
    proc = start(data_dir, tmp_path)
    wait_for_epoch(proc, tmp_path, 1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code
    assert stderr.strip().splitlines()[-1].startswith(word) and "--resume" in stderr
    assert "Traceback" not in stderr and not list(tmp_path.rglob("*.tmp"))
    assert torch.load(tmp_path / "resnet18" / "checkpoint.pt", weights_only=True)["epoch"] >= 1
    resumed = run_cli(*QUICK, "--data-dir", data_dir, "--out-dir", tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_state(tmp_path / "resnet18" / "qat.pt", finished / "qat.pt")


def test_resume_of_a_finished_run_reuses_both_training_stages(data_dir, finished, tmp_path):
    import shutil
    shutil.copytree(finished, tmp_path / "resnet18")
    proc = run_cli(*QUICK, "--data-dir", data_dir, "--out-dir", tmp_path, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fp32 epoch" not in proc.stdout and "qat epoch" not in proc.stdout
    assert same_state(tmp_path / "resnet18" / "qat.pt", finished / "qat.pt")


def test_resume_with_other_float_settings_is_refused_and_changes_nothing(data_dir, finished, tmp_path):
    import shutil
    shutil.copytree(finished, tmp_path / "resnet18")
    before = snapshot(tmp_path / "resnet18")
    proc = run_cli(*QUICK, "--epochs", "4", "--data-dir", data_dir, "--out-dir", tmp_path, "--resume")
    assert proc.returncode == 2 and "--epochs 3 (this run: 4)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and snapshot(tmp_path / "resnet18") == before


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, "truncated"])
def test_corrupt_checkpoint_is_a_clear_error(data_dir, finished, tmp_path, content):
    folder = tmp_path / "resnet18"
    folder.mkdir()
    if content == "truncated":
        content = (finished / "checkpoint.pt").read_bytes()[:5000]
    (folder / "checkpoint.pt").write_bytes(content)
    before = snapshot(folder)
    proc = run_cli(*QUICK, "--data-dir", data_dir, "--out-dir", tmp_path, "--resume")
    assert proc.returncode == 2 and "checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(folder) == before


@pytest.mark.parametrize("which", ["other_model", "truncated", "not_a_state_dict"])
def test_bad_float_checkpoint_is_a_clear_error(data_dir, finished, tmp_path, which):
    path = tmp_path / "weights.pt"
    if which == "other_model":
        torch.save(__import__("models").create_model("mobilenet_v2").state_dict(), path)
    elif which == "truncated":
        path.write_bytes((finished / "fp32.pt").read_bytes()[:10000])
    else:
        torch.save({"epoch": 3}, path)
    proc = run_cli(*QUICK, "--float-checkpoint", path, "--data-dir", data_dir, "--out-dir", tmp_path / "out")
    assert proc.returncode == 2 and str(path) in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_float_checkpoint_skips_float_training(data_dir, finished, tmp_path):
    proc = run_cli(*QUICK, "--float-checkpoint", finished / "fp32.pt", "--data-dir", data_dir,
                   "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fp32 epoch" not in proc.stdout and same_state(tmp_path / "resnet18" / "fp32.pt", finished / "fp32.pt")


def test_empty_split_is_a_clear_error(tmp_path):
    root = write_folder(tmp_path / "cifar", per_class=1)
    for p in (root / "test").rglob("*.png"):
        p.unlink()
    proc = run_cli("--data-dir", root, "--out-dir", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 2 and "no images" in proc.stderr and "Traceback" not in proc.stderr


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")

    def half_then_fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(utils.WriteError, match="cannot write '.*report.json': No space left on device"):
        utils.atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_second_run_on_a_busy_folder_is_one_line_and_the_first_completes(data_dir, tmp_path):
    first = start(data_dir, tmp_path)
    wait_for_epoch(first, tmp_path, 1)
    second = run_cli(*QUICK, "--data-dir", data_dir, "--out-dir", tmp_path)
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"error: '{tmp_path / 'resnet18'}' is in use by another run (process {first.pid}: " in second.stderr
    assert second.stdout == ""  # it ended before reading anything
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    written = {p.name for p in (tmp_path / "resnet18").iterdir()}
    assert {"fp32.pt", "qat.pt", "int8.pt", "int8.onnx", "report.json"} <= written


def test_exclusive_folder_names_its_holder_and_removes_what_it_made_empty(tmp_path):
    folder = tmp_path / "out" / "resnet18"
    with utils.exclusive_folder(folder):
        busy = f"'{folder}' is in use by another run (process {os.getpid()}: "
        with pytest.raises(utils.UserError, match=re.escape(busy)):
            with utils.exclusive_folder(folder):
                pass
        with utils.exclusive_folder(tmp_path / "out" / "mobilenet_v2"):  # another model's folder is free
            pass
    assert not (tmp_path / "out").exists()  # made for a run that wrote nothing: removed
    with utils.exclusive_folder(folder):
        (folder / "fp32.pt").write_text("written")
    assert (folder / "fp32.pt").read_text() == "written"  # a folder the run wrote into stays


def test_kill_9_in_pt2e_qat_then_resume_gives_the_uninterrupted_weights(data_dir, tmp_path):
    """A PT2E QAT killed after its first epoch resumes from checkpoint.pt (the QAT graph's state_dict) to the
    weights of a run that was never interrupted."""
    pt2e_args = ["--flow", "pt2e", "--epochs", "1", "--qat-epochs", "2"]
    # the uninterrupted run is needed only up to its QAT weights (written atomically); its files after them take
    # a minute and the resumed run below makes them
    whole, weights = start(data_dir, tmp_path / "whole", *pt2e_args), tmp_path / "whole" / "resnet18" / "qat_pt2e.pt"
    deadline = time.time() + 300
    while whole.poll() is None and not weights.exists() and time.time() < deadline:
        time.sleep(0.2)
    whole.kill()
    assert weights.exists(), whole.communicate()[1][-2000:]
    proc = start(data_dir, tmp_path / "cut", *pt2e_args)
    ckpt, deadline = tmp_path / "cut" / "resnet18" / "checkpoint.pt", time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["stage"] == "qat_pt2e":
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "resnet18" / "qat_pt2e.pt").exists()
    resumed = run_cli(*QUICK, *pt2e_args, "--data-dir", data_dir, "--out-dir", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "qat_pt2e epoch 1/2" not in resumed.stdout and "qat_pt2e epoch 2/2" in resumed.stdout
    assert same_state(tmp_path / "cut" / "resnet18" / "qat_pt2e.pt", weights)
    report = json.loads((tmp_path / "cut" / "resnet18" / "report.json").read_text())
    assert report["flow"] == "pt2e" and "int8" not in report["accuracy"] and report["accuracy"]["pt2e_int8"] > 0
    # torch is not among its --deploy-runtimes: no AOTInductor packages, which nothing would verify
    assert not {"pt2e_int8_aoti", "fp32_aoti"} & set(report["artifacts"])
    assert not list((tmp_path / "cut" / "resnet18").glob("*.pt2"))
