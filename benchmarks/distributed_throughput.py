"""Training throughput of 1 process x N threads against N processes x 1 thread (torchrun, gloo), same steps.

Both sides run cifar.py on the same data with the same global batch (1 x B against N x B/N), so they train on the
same images in the same number of steps; the float and QAT images/s come from each run's report.json (training
time only, evaluation excluded). The sides alternate for --rounds rounds, because this machine's speed drifts
within minutes; the table gives the median of each and the ratio.

    python benchmarks/distributed_throughput.py --model resnet18 --rounds 3
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cifar  # noqa: E402
import report  # noqa: E402


def run(side, args, out):
    """One cifar.py run; returns report.json."""
    n = args.processes
    common = ["--model", args.model, "--epochs", str(args.epochs), "--qat-epochs", "1", "--qat-batches",
              str(args.qat_batches), "--train-subset", str(args.train_subset), "--test-subset", "500",
              "--no-ptq", "--bench-runs", "1", "--bench-warmup", "0", "--bench-batch-sizes", "1",
              "--data-dir", args.data_dir, "--out-dir", str(out)]
    if side == "1 process":
        cmd = [sys.executable, str(ROOT / "cifar.py"), *common, "--batch-size", str(args.batch_size),
               "--threads", str(n)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               str(ROOT / "cifar.py"), *common, "--batch-size", str(args.batch_size // n), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: {side} run failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads((out / args.model / "report.json").read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=["mobilenet_v2", "resnet18"])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the recipe's)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--qat-batches", type=int, default=40)
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DIR", "data"))
    args = p.parse_args()
    args.batch_size = args.batch_size or cifar.DEFAULTS[args.model]["batch_size"]
    sides = ["1 process", f"{args.processes} processes"]
    speed = {s: {"fp32": [], "qat": []} for s in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side in sides:
                result = run(side, args, Path(tmp) / f"{r}_{side[0]}")
                for stage in ("fp32", "qat"):
                    speed[side][stage].append(result["train_images_per_s"][stage])
                print(f"round {r + 1}/{args.rounds}, {side}: float {speed[side]['fp32'][-1]:.0f} img/s, "
                      f"QAT {speed[side]['qat'][-1]:.0f} img/s", flush=True)
    n = args.processes
    print(f"\n{args.model}, global batch {args.batch_size}, {args.train_subset} images x {args.epochs} float epochs + "
          f"{args.qat_batches} QAT batches; {report.platform_cpu()}, {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}; median of {args.rounds} alternating rounds\n")
    print(f"| stage | 1 process x {n} threads (img/s) | {n} processes x 1 thread (img/s) | ratio |")
    print("|---|---|---|---|")
    for stage, label in (("fp32", "float"), ("qat", "QAT")):
        a, b = (statistics.median(speed[s][stage]) for s in sides)
        spread = lambda s: f"{min(speed[s][stage]):.0f}-{max(speed[s][stage]):.0f}"
        print(f"| {label} | {a:.0f} ({spread(sides[0])}) | {b:.0f} ({spread(sides[1])}) | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
