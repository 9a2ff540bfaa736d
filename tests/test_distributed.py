"""torchrun: global batches shared between processes, batch norm over the global batch, rank-0 writes, one error."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
import training
from conftest import ROOT, run_cli


def test_the_shares_of_a_global_batch_are_the_single_process_batch():
    images = torch.randint(0, 256, (107, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(107)
    one = list(data.Batches(images, labels, 24, 3, "cpu", padding=4, cutout=8))
    for world in (2, 3):
        shares = [list(data.Batches(images, labels, 24 // world, 3, "cpu", padding=4, cutout=8, rank=r,
                                    world=world)) for r in range(world)]
        assert all(len(s) == len(one) for s in shares)  # 107 = 4 x 24 + 11: the last batch is kept
        for step, (x, y) in enumerate(one):
            assert torch.equal(torch.cat([s[step][0] for s in shares]), x)  # same images, same augmentation
            assert torch.equal(torch.cat([s[step][1] for s in shares]), y)


def test_a_last_global_batch_too_small_for_two_images_per_process_is_dropped():
    images, labels = torch.zeros(51, 32, 32, 3, dtype=torch.uint8), torch.arange(51)
    assert len(data.Batches(images, labels, 25, 0, "cpu", rank=0, world=1)) == 2  # 1 image left: dropped too
    assert len(data.Batches(images, labels, 25, 0, "cpu", rank=0, world=2)) == 1  # 1 image for 2 processes
    assert len(data.Batches(torch.zeros(54, 32, 32, 3, dtype=torch.uint8), torch.arange(54), 25, 0, "cpu",
                            rank=1, world=2)) == 2  # 4 images left: 2 per process


def loss_weights(x):
    """A loss that weights every element differently, so that every gradient path counts."""
    return torch.arange(x.numel()).view_as(x).sin()


def sync_bn_worker(rank, world, init_file, x, result):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
    bn = training.convert_sync_batchnorm(bn, torch.device("cpu"))
    share = x.tensor_split(world)[rank].clone().requires_grad_()
    out = bn(share)
    (out * loss_weights(x).tensor_split(world)[rank]).sum().backward()
    dist.all_reduce(bn.weight.grad)
    result[rank] = dict(out=out.detach(), x_grad=share.grad, w_grad=bn.weight.grad,
                        running_var=bn.running_var.clone())
    dist.destroy_process_group()


def test_cpu_sync_batchnorm_is_batchnorm_of_the_whole_batch():
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
    xr = x.clone().requires_grad_()
    out = bn(xr)
    (out * loss_weights(x)).sum().backward()
    with tempfile.TemporaryDirectory() as d, mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(sync_bn_worker, args=(2, f"{d}/init", x, result), nprocs=2)
        shares = [result[r] for r in range(2)]
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert close(torch.cat([s["out"] for s in shares]), out.detach())
    assert close(torch.cat([s["x_grad"] for s in shares]), xr.grad)
    assert close(shares[0]["w_grad"], bn.weight.grad) and close(shares[0]["running_var"], bn.running_var)
    # the measure can fail: each half's own statistics are another normalisation
    assert not close(torch.nn.functional.batch_norm(x[:4], None, None, training=True), out.detach()[:4])


def qat_worker(rank, world, init_file, result):
    """Two QAT steps under DDP with observers on; the quantization parameters of every process, before and after
    training.broadcast_buffers."""
    import models
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = models.create_model("resnet18")
    models.prepare_quantization(model, qat=True)
    net = training.distribute(model, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(2):
        x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(10 * step + rank))  # own shares
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), torch.arange(8)).backward()
        optimizer.step()
    scales = lambda: {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("scale", "zero_point"))}
    before = scales()
    training.broadcast_buffers(model)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    result[rank] = dict(before=before, after=scales(), weights=weights)
    dist.destroy_process_group()


def test_quantization_parameters_are_the_same_on_every_process_after_broadcast_buffers():
    with tempfile.TemporaryDirectory() as d, mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(qat_worker, args=(2, f"{d}/init", result), nprocs=2)
        r0, r1 = result[0], result[1]
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert same(r0["weights"], r1["weights"])  # DDP: identical weights, hence identical weight observers
    # DDP broadcasts rank 0's buffers before each forward, then every process's observers see its own share
    assert not same(r0["before"], r1["before"])
    assert same(r0["after"], r1["after"]) and same(r0["after"], r0["before"])


# ---------------------------------------------------------------- the pipeline under torchrun

ARGS = ["--model", "resnet18", "--qat-epochs", "1", "--lr", "0.02", "--no-ptq", "--deploy-runtimes", "onnxruntime",
        "--bench-runs", "2", "--bench-warmup", "0", "--bench-batch-sizes", "1"]


def torchrun(*args, probe, data_dir, out, wait=True):
    """tests/torchrun_probe.py (cifar.py recording each rank's writes and pid) on 2 processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "torchrun_probe.py"), *ARGS, *map(str, args), "--data-dir", str(data_dir),
           "--out-dir", str(out)]
    probe.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PROBE_DIR": str(probe), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def our_lines(stderr):
    """stderr without torchrun's own log lines and failure summary."""
    return [l for l in stderr.splitlines() if re.match(r"(\S+\.py: )?(error|terminated|interrupted):|rank \d+:", l)]


def weight_distance(a, b):
    """||a - b|| / ||a|| over all weights of two state_dict files."""
    sa, sb = (torch.load(p, weights_only=True) for p in (a, b))
    keys = [k for k in sa if k.endswith("weight")]
    return (sum(((sa[k] - sb[k]) ** 2).sum() for k in keys) / sum((sa[k] ** 2).sum() for k in keys)).sqrt().item()


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """One float epoch (4 steps of 50 images) + one QAT epoch: 1 process, and 2 x 25 with and without --sync-bn."""
    root = tmp_path_factory.mktemp("torchrun")
    one = run_cli(*ARGS, "--epochs", 1, "--batch-size", 50, "--threads", 1, "--data-dir", data_dir,
                  "--out-dir", root / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    runs = {"one": (root / "one" / "resnet18", None)}
    for name, extra in (("sync", ["--sync-bn"]), ("nosync", [])):
        proc = torchrun("--epochs", 1, "--batch-size", 25, *extra, probe=root / f"probe_{name}", data_dir=data_dir,
                        out=root / name)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (root / name / "resnet18", root / f"probe_{name}")
    return runs


@pytest.mark.slow
def test_two_processes_write_the_artifacts_and_report_keys_of_one(runs):
    import json
    (one, _), (two, _) = runs["one"], runs["sync"]
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert r1.keys() == r2.keys() and r1["accuracy"].keys() == r2["accuracy"].keys()
    assert r1["distributed"] == dict(world_size=1, backend=None, threads_per_process=1, batch_per_process=50,
                                     global_batch=50, sync_bn=False, lr=0.02, qat_lr=0.0002)
    assert r2["distributed"] == dict(r1["distributed"], world_size=2, backend="gloo", batch_per_process=25,
                                     sync_bn=True)
    assert r2["environment"]["threads"] == 2  # rank 0 benchmarks on the cores of both processes


@pytest.mark.slow
def test_only_rank_0_writes(runs):
    two, probe = runs["sync"]
    written = {os.path.basename(l) for l in (probe / "rank0.writes").read_text().split()}
    assert not (probe / "rank1.writes").exists() and (probe / "rank1.pid").exists()
    assert {p.name for p in two.iterdir()} <= written


@pytest.mark.slow
def test_sync_bn_gives_the_single_process_weights_and_plain_ddp_nearly(runs):
    one = runs["one"][0] / "fp32.pt"
    sync, nosync = (weight_distance(one, runs[k][0] / "fp32.pt") for k in ("sync", "nosync"))
    # 1 vs 2 threads in one process differ by 1e-5 (rounding); per-process BN statistics by 4e-4
    assert sync < 1e-4 < nosync < 3e-3


@pytest.mark.slow
@pytest.mark.parametrize("bad", [["--epochs", "0"], ["--data-dir", "/nonexistent/cifar"]])
def test_bad_input_is_one_line_once(data_dir, tmp_path, bad):
    args = ["--epochs", "1", *bad] if bad[0] == "--epochs" else ["--epochs", "1"]
    proc = torchrun(*args, probe=tmp_path / "probe", data_dir=bad[1] if bad[0] == "--data-dir" else data_dir,
                    out=tmp_path / "out")
    lines = our_lines(proc.stderr)
    assert proc.returncode != 0 and len(lines) == 1 and "error:" in lines[0], proc.stderr[-3000:]
    assert 'cifar.py", line' not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_killed_process_ends_the_job_and_resume_gives_the_uninterrupted_weights(data_dir, tmp_path):
    ref = torchrun("--epochs", 3, "--batch-size", 25, probe=tmp_path / "p_ref", data_dir=data_dir, out=tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    out, probe = tmp_path / "run", tmp_path / "p_run"
    proc = torchrun("--epochs", 3, "--batch-size", 25, probe=probe, data_dir=data_dir, out=out, wait=False)
    ckpt, deadline = out / "resnet18" / "checkpoint.pt", time.time() + 300
    while not (ckpt.exists() and torch.load(ckpt, weights_only=True)["epoch"] >= 1):
        assert time.time() < deadline and proc.poll() is None, "the run never reached its first checkpoint"
        time.sleep(0.1)
    os.kill(int((probe / "rank1.pid").read_text()), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    lines = our_lines(stderr)
    assert proc.returncode != 0 and len(lines) == 1 and "--resume" in lines[0] and "torchrun" in lines[0], stderr
    assert not (out / "resnet18" / "qat.pt").exists()
    resumed = torchrun("--epochs", 3, "--batch-size", 25, "--resume", probe=probe, data_dir=data_dir, out=out)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    for name in ("fp32.pt", "qat.pt"):
        assert weight_distance(tmp_path / "ref" / "resnet18" / name, out / "resnet18" / name) == 0
