"""Where the PT2E files lose time: AOTInductor with a dynamic against a static batch, and ONNX Runtime's time per
operator type in int8_pt2e.onnx against the eager int8.onnx.

Reads a finished `--flow both` run folder. (1) Times, interleaved in this process, the eager int8 TorchScript file
under fbgemm and onednn, the run's int8_pt2e.pt2 (dynamic batch) and packages of the same PT2E int8 model compiled
here for one static batch size each. (2) Runs both ONNX files in ONNX Runtime with its profiler and sums the
kernel time per operator type (after ONNX Runtime's graph optimizations: which Q/DQ groups became QLinearConv).

    python benchmarks/pt2e_forms.py save_models/mobilenet_v2
"""
import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import deploy  # noqa: E402
import models  # noqa: E402
import pt2e  # noqa: E402
import report  # noqa: E402
import training  # noqa: E402


def pt2e_int8(run_dir, r):
    """The run's PT2E int8 reference, rebuilt from fp32.pt and qat_pt2e.pt."""
    fp32 = models.create_model(r["model"])
    fp32.load_state_dict(training.load_state_dict(run_dir / "fp32.pt", fp32))
    qat = pt2e.prepare_qat(fp32, r["args"]["pt2e_reduce_range"])
    qat.load_state_dict(torch.load(run_dir / "qat_pt2e.pt", weights_only=True))
    qat.observe(False)
    return pt2e.convert(qat)


def static_package(model, batch, path):
    """An AOTInductor package of model for one batch size (no dynamic dimension)."""
    with torch.no_grad():
        program = torch.export.export(model, (torch.zeros(batch, 3, 32, 32),))
        return torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                         inductor_configs=pt2e.AOTI_CONFIG)


def ort_profile(path, batch, threads, calls):
    """{operator type: microseconds per call} from ONNX Runtime's profiler, and the optimized graph's op counts."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "profile")
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
        for _ in range(calls):
            session.run(None, {"input": x})
        events = json.loads(Path(session.end_profiling()).read_text())
        import onnx
        ops = collections.Counter(n.op_type for n in onnx.load(str(Path(tmp) / "optimized.onnx")).graph.node)
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / calls
    return per_op, ops


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished --flow both run's folder (save_models/<model>)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=200, help="timed calls per form and batch size")
    a = p.parse_args()
    r = json.loads((a.run_dir / "report.json").read_text())
    torch.set_num_threads(a.threads)
    env = report.environment(a.threads)
    print(f"{r['model']} ({a.run_dir}); {env['cpu']} ({env['cpu_capability']}), {a.threads} threads, "
          f"{a.runs} calls per form in 5 interleaved rounds after 20 warm-up calls, median ms")
    int8 = pt2e_int8(a.run_dir, r)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        print("\n| batch | " + " | ".join(["eager fbgemm", "eager onednn", "AOTI dynamic batch", "AOTI static batch"])
              + " |\n|---|---|---|---|---|")
        for b in a.batch_sizes:
            forms = {}
            for engine in ("fbgemm", "onednn"):
                torch.backends.quantized.engine = engine
                forms[f"eager {engine}"] = deploy.on_engine(torch.jit.load(a.run_dir / "int8.pt"), engine, a.threads)
            forms["AOTI dynamic"] = torch._inductor.aoti_load_package(str(a.run_dir / "int8_pt2e.pt2"))
            forms["AOTI static"] = torch._inductor.aoti_load_package(static_package(int8, b, Path(tmp) / f"{b}.pt2"))
            x = torch.randn(b, 3, 32, 32)
            times = deploy.time_interleaved({k: (lambda f=f: f(x)) for k, f in forms.items()}, 20, a.runs, 5, 0.01)
            print(f"| {b} | " + " | ".join(f"{t['median']:.3f}" for t in times.values()) + " |", flush=True)
    for b in a.batch_sizes:
        profiles = {name: ort_profile(a.run_dir / name, b, a.threads, a.runs)
                    for name in ("int8.onnx", "int8_pt2e.onnx")}
        print(f"\nONNX Runtime at batch {b}: kernel time per operator type, microseconds per call "
              f"(the optimized graph's count)")
        print("| operator | int8.onnx | int8_pt2e.onnx |\n|---|---|---|")
        names = sorted(set().union(*(p[0] for p in profiles.values())), key=lambda n: -max(
            p[0].get(n, 0) for p in profiles.values()))
        for n in names:
            print(f"| {n} | " + " | ".join(f"{p[0].get(n, 0):.0f} ({p[1].get(n, 0)})" for p in profiles.values())
                  + " |")
        print("| total | " + " | ".join(f"{sum(p[0].values()):.0f}" for p in profiles.values()) + " |")


if __name__ == "__main__":
    main()
