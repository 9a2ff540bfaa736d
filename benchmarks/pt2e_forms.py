"""Where the PT2E files lose time: AOTInductor with a dynamic against a static batch, and ONNX Runtime's time per
operator type in int8_pt2e.onnx against the eager int8.onnx.

Reads a finished `--flow both` run folder. (1) Times, interleaved in this process, the eager int8 TorchScript file
under fbgemm and onednn, the run's int8_pt2e.pt2 (dynamic batch) and packages of the same PT2E int8 model compiled
here for one static batch size each. (2) Counts, from oneDNN's log, the primitives the eager onednn file and the
package create and run per call, their kernel time and the reorders among them. (3) Runs both ONNX files in ONNX
Runtime with its profiler and sums the kernel time per operator type (after ONNX Runtime's graph optimizations:
which Q/DQ groups became QLinearConv).

    python benchmarks/pt2e_forms.py save_models/mobilenet_v2
"""
import argparse
import collections
import json
import re
import subprocess
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


ONEDNN_CALLS = """
import ctypes, sys, torch
torch.set_num_threads(int(sys.argv[3]))
if sys.argv[1].endswith(".pt2"):
    model = torch._inductor.aoti_load_package(sys.argv[1])
else:
    torch.backends.quantized.engine = "onednn"
    model = torch.jit.load(sys.argv[1])
x = torch.randn(int(sys.argv[2]), 3, 32, 32)
with torch.inference_mode():
    for _ in range(5):
        model(x)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        for _ in range(3):  # the first calls with the log on are slow: oneDNN sets up its logging
            model(x)
        ctypes.CDLL(None).printf(b"-- timed calls --\\n")  # through C's stdout buffer, in order with oneDNN's lines
        for _ in range(int(sys.argv[4])):
            model(x)
"""
VERBOSE_LINE = re.compile(r"^onednn_verbose,(?:v1,)?primitive,(create[^,]*|exec),[^,]*,([a-z_]+),.*,([0-9.]+)$")


def onednn_work(path, batch, threads, calls=3):
    """(oneDNN primitives created per call, executed per call, ms of kernel execution per call, reorders executed
    per call, their ms per call) of one model file after warm-up, from oneDNN's own log of the timed calls, in a
    child process. A reorder in a timed call re-lays out a tensor, a weight where the prepacked layout is not the
    one the convolution chose for this batch and thread count."""
    log = subprocess.run([sys.executable, "-c", ONEDNN_CALLS, str(path), str(batch), str(threads), str(calls)],
                         capture_output=True, text=True, check=True).stdout
    events = [m.groups() for m in map(VERBOSE_LINE.match, log.split("-- timed calls --")[1].splitlines()) if m]
    executed = [(kind, float(ms)) for event, kind, ms in events if event == "exec"]
    reorders = [ms for kind, ms in executed if kind == "reorder"]
    return (sum(event != "exec" for event, _, _ in events) / calls, len(executed) / calls,
            sum(ms for _, ms in executed) / calls, len(reorders) / calls, sum(reorders) / calls)


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
    print("\noneDNN per call (ONEDNN_VERBOSE=all): primitives created, executed, kernel ms (of which reorders)")
    print("| batch | eager onednn (int8.pt) | AOTI dynamic batch (int8_pt2e.pt2) |\n|---|---|---|")
    for b in a.batch_sizes:
        work = [onednn_work(a.run_dir / name, b, a.threads) for name in ("int8.pt", "int8_pt2e.pt2")]
        print(f"| {b} | " + " | ".join(f"{c:.0f} created, {e:.0f} run, {ms:.3f} ms ({r:.0f} reorders, {r_ms:.3f} ms)"
                                       for c, e, ms, r, r_ms in work) + " |")
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
