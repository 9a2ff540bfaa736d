"""ONNX Runtime latency of a run's fp32.onnx and int8.onnx under different session settings, in one process.

Why int8 is (or is not) faster than fp32 in ONNX Runtime: the graph optimisation level decides whether the
exported QuantizeLinear/DequantizeLinear pairs around each conv are fused into QLinearConv; thread count and
thread-pool spinning change batch-1 latency. Each setting is timed once sequentially (all fp32 calls, then all int8
calls, as cifar.py's benchmark does) and once in alternating rounds, after warm-up; medians in ms.

    python benchmarks/ort_settings.py save_models/resnet18
"""
import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

LEVELS = ort.GraphOptimizationLevel
SETTINGS = {  # name: (optimisation level, intra-op threads or None for --threads, spinning)
    "all (cifar.py's)": (LEVELS.ORT_ENABLE_ALL, None, True),
    "all, spinning off": (LEVELS.ORT_ENABLE_ALL, None, False),
    "extended": (LEVELS.ORT_ENABLE_EXTENDED, None, True),
    "basic": (LEVELS.ORT_ENABLE_BASIC, None, True),
    "all, 1 thread": (LEVELS.ORT_ENABLE_ALL, 1, True),
}


def session(path, level, threads, spinning):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def times(sess, x, n):
    out = []
    for _ in range(n):
        start = time.perf_counter()
        sess.run(None, {"input": x})
        out.append((time.perf_counter() - start) * 1000)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a folder with fp32.onnx and int8.onnx (save_models/<model>)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.run_dir}, median ms; in turns: 4 alternating rounds")
    for bs in args.batch_sizes:
        x = np.random.default_rng(0).standard_normal((bs, 3, 32, 32), dtype=np.float32)
        n = 25 if bs == 1 else 5  # calls per round; 2n per side sequentially
        for name, (level, threads, spinning) in SETTINGS.items():
            fp32, int8 = (session(args.run_dir / f, level, threads or args.threads, spinning)
                          for f in ("fp32.onnx", "int8.onnx"))
            times(fp32, x, args.warmup), times(int8, x, args.warmup)
            seq = np.median(times(fp32, x, 2 * n)), np.median(times(int8, x, 2 * n))
            turns = [], []
            for _ in range(4):
                turns[0].extend(times(fp32, x, n))
                turns[1].extend(times(int8, x, n))
            alt = np.median(turns[0]), np.median(turns[1])
            print(f"batch {bs:3d}  {name:18s} sequential fp32 {seq[0]:7.2f} int8 {seq[1]:7.2f} ({seq[0] / seq[1]:.2f}x)"
                  f"  in turns fp32 {alt[0]:7.2f} int8 {alt[1]:7.2f} ({alt[0] / alt[1]:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
