"""Faults during a run: divergence, failed writes, failing third-party steps and SIGTERM each end with one line,
their exit code, no temporary file and no artifact from the broken stage."""
import errno
import subprocess
import sys

import pytest
import torch

import cifar
import eager
import export
import models
import utils
from conftest import ROOT, run_cli
from test_reliability import QUICK

pytestmark = pytest.mark.slow  # most tests here run cifar.py in a subprocess


def one_line_error(proc, code, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def no_temp_files(folder):
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_diverging_float_training_writes_nothing(data_dir, tmp_path):
    proc = run_cli(*QUICK, "--lr", "1e6", "--data-dir", data_dir, "--out-dir", tmp_path)
    one_line_error(proc, 3, "fp32 training diverged in epoch 1/3", "batch 2/4", "--lr (now 1e+06)")
    written = {p.name for p in (tmp_path / "resnet18").glob("*")} if (tmp_path / "resnet18").exists() else set()
    assert not written & {"fp32.pt", "qat.pt", "int8.pt", "report.json", "fp32.onnx", "int8.onnx"}


def test_diverging_qat_keeps_the_float_stage_and_resumes_with_another_qat_lr(data_dir, tmp_path):
    proc = run_cli(*QUICK, "--qat-lr", "1e6", "--data-dir", data_dir, "--out-dir", tmp_path)
    one_line_error(proc, 3, "qat training diverged in epoch 1/1", "--qat-lr", "--resume")
    out = tmp_path / "resnet18"
    assert {"fp32.pt", "checkpoint.pt", "report.json"} <= {p.name for p in out.iterdir()}
    assert not {"qat.pt", "int8.pt", "fp32.onnx", "int8.onnx"} & {p.name for p in out.iterdir()}
    assert "int8" not in __import__("json").loads((out / "report.json").read_text())["accuracy"]
    resumed = run_cli(*QUICK, "--qat-lr", "1e-3", "--resume", "--data-dir", data_dir, "--out-dir", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "fp32 epoch" not in resumed.stdout and (out / "int8.pt").is_file()


def test_non_finite_weights_are_refused_before_conversion():
    args = cifar.parse_args(["--model", "resnet18"])
    qat = models.create_model("resnet18")
    models.prepare_quantization(qat, qat=True)
    with torch.no_grad():
        qat(torch.randn(2, 3, 32, 32))  # observers see data: finite scales
    scale = next(m for m in qat.modules() if isinstance(m, torch.ao.quantization.FakeQuantize)).scale
    scale.fill_(float("nan"))
    with pytest.raises(utils.Diverged, match="the QAT model holds non-finite values"):
        eager.quantize_int8(qat, args)


class FullDisk:
    """A file that takes a few bytes, then fails as a full disk does."""

    def __init__(self, path, mode):
        self.file, self.name = open(path, mode), path

    def write(self, data):
        self.file.write(bytes(data)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize("what", ["state_dict", "torchscript", "onnx"])
def test_a_failed_write_names_the_file_and_keeps_the_earlier_one(what, tmp_path, monkeypatch):
    path = tmp_path / "artifact"
    path.write_bytes(b"earlier good file")
    model = models.create_model("resnet18")
    obj = {"state_dict": lambda: model.state_dict(), "torchscript": lambda: models.to_torchscript(model),
           "onnx": lambda: export.export_onnx(model, "m.onnx")[0]}[what]()
    monkeypatch.setattr(utils, "open", FullDisk, raising=False)  # the file atomic_write opens
    with pytest.raises(utils.WriteError, match=f"cannot write '{path}': No space left on device"):
        (export.save_onnx if what == "onnx" else utils.torch_save)(obj, path)
    assert path.read_bytes() == b"earlier good file" and [p.name for p in tmp_path.iterdir()] == ["artifact"]


@pytest.fixture
def full_disk(tmp_path):
    """A real 1 MiB file system (tmpfs; needs root, as on the project's machines and CI)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_earlier_file(data_dir, tmp_path, full_disk):
    weights = tmp_path / "weights.pt"
    torch.save(models.create_model("resnet18").state_dict(), weights)  # 45 MB: cannot fit
    (full_disk / "resnet18").mkdir()
    (full_disk / "resnet18" / "fp32.pt").write_bytes(b"earlier good file")
    proc = run_cli(*QUICK, "--float-checkpoint", weights, "--data-dir", data_dir, "--out-dir", full_disk,
                   "--cache-dir", tmp_path / "cache")
    one_line_error(proc, 4, f"cannot write '{full_disk}/resnet18/fp32.pt': No space left on device")
    assert (full_disk / "resnet18" / "fp32.pt").read_bytes() == b"earlier good file"
    assert [p.name for p in (full_disk / "resnet18").iterdir()] == ["fp32.pt"]


THIRD_PARTY = {  # a stage, and a call inside it made to fail as a broken library would
    "onnx": "torch.onnx.export",
    "ptq": "torch.ao.quantization.observer.HistogramObserver.forward",
}


@pytest.mark.parametrize("stage", THIRD_PARTY)
def test_a_failing_third_party_step_is_one_line_naming_the_stage(stage, data_dir, tmp_path):
    target = THIRD_PARTY[stage]
    module, attr = target.rsplit(".", 1)
    code = (f"import sys, pydoc, cifar; owner = pydoc.locate({module!r});"
            f"setattr(owner, {attr!r}, lambda *a, **k: (_ for _ in ()).throw(RuntimeError('simulated crash')));"
            "sys.exit(cifar.cli(sys.argv[1:]))")
    quick = [a for a in QUICK if a != "--no-ptq"]
    run = lambda *extra: subprocess.run([sys.executable, "-c", code, *quick, "--data-dir", str(data_dir),
                                         "--out-dir", str(tmp_path), *extra], capture_output=True, text=True,
                                        cwd=ROOT, timeout=600)
    proc = run()
    one_line_error(proc, 1, f"stage {stage} failed: RuntimeError: simulated crash")
    out = tmp_path / "resnet18"
    assert not (out / "fp32.onnx").exists() and not (out / "int8.onnx").exists() and no_temp_files(tmp_path)
    debug = run("--debug", "--resume")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "simulated crash" in debug.stderr


def test_deprecations_are_hidden_and_an_unrelated_warning_still_shows(data_dir, tmp_path):
    code = ("import sys, warnings, cifar, training; top1 = training.top1;"
            "training.top1 = lambda *a: (warnings.warn('an unrelated warning'), top1(*a))[1];"
            "sys.exit(cifar.cli(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *QUICK, "--data-dir", str(data_dir), "--out-dir",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "an unrelated warning" in proc.stderr
    assert "deprecated" not in proc.stderr and proc.stdout.count("are deprecated in torch") == 1
