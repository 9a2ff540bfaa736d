"""cifar.py's deploy timing against torch.utils.benchmark on the same forms, in one process.

The deploy stage times each call on its own (deploy.time_interleaved: median and p90 of single calls, forms taking
turns in rounds). torch.utils.benchmark.Timer.blocked_autorange times blocks of calls and reports the median of
block means: no per-call tail. This prints both medians side by side, in alternating turns, for a run's int8 and
fp32 forms in PyTorch and ONNX Runtime, so that a difference between the two methods would show.

    python benchmarks/timer_check.py save_models/mobilenet_v2 [--threads 2]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deploy  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run's folder (save_models/<model>)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = models.ENGINE
    int8 = torch.jit.load(args.run_dir / "int8.pt")
    sessions = {n: deploy.ort_session(args.run_dir / f"{n}.onnx", args.threads) for n in ("fp32", "int8")}
    forms = {"torch_int8_fbgemm": int8,
             "onnxruntime_fp32": lambda x: sessions["fp32"].run(None, {"input": x.numpy()}),
             "onnxruntime_int8": lambda x: sessions["int8"].run(None, {"input": x.numpy()})}
    print(f"{report.platform_cpu()}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads; "
          f"median ms of {args.rounds} alternating turns")
    with torch.inference_mode():
        for b in (1, 64):
            x = torch.randn(b, 3, 32, 32)
            ours, theirs = {n: [] for n in forms}, {n: [] for n in forms}
            for _ in range(args.rounds):
                for name, fn in forms.items():
                    ours[name].append(deploy.time_interleaved({name: lambda: fn(x)}, 10, 50, 5)[name]["median"])
                    timer = benchmark.Timer("fn(x)", globals=dict(fn=fn, x=x), num_threads=args.threads)
                    theirs[name].append(timer.blocked_autorange(min_run_time=1).median * 1e3)
            for name in forms:
                a, t = sorted(ours[name])[len(ours[name]) // 2], sorted(theirs[name])[len(theirs[name]) // 2]
                print(f"batch {b:2d} {name:18s} per-call median {a:8.3f}  blocked_autorange {t:8.3f}  "
                      f"({a / t:.3f})", flush=True)


if __name__ == "__main__":
    main()
