"""The pipeline's int8 files beside what the runtimes' own post-training quantizers make of the same fp32.onnx.

ONNX Runtime's quantize_static (QDQ, per-channel int8 weights, uint8 activations) and NNCF's PTQ (nncf.quantize on
the OpenVINO model) each calibrate on the very batches the pipeline's PTQ uses (data.calibration_batches). Every
form is scored on the run's test images (top-1, agreement with PyTorch int8 of int8.pt, the deploy stage's
reference) and timed like the deploy stage: all forms in turns, at each batch size, on --threads threads and on 1.
NNCF is a peer here, not a dependency of the pipeline: pip install -r benchmarks/requirements.txt.

    python benchmarks/peer_ptq.py --run-dir save_models/resnet18
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cifar  # noqa: E402
import data as data_module  # noqa: E402
import deploy  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402
import training  # noqa: E402


def ort_quantize_static(fp32_onnx, batches, path, reduce_range):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input": x.contiguous().numpy()} for x in batches])

        def get_next(self):
            return next(self.feeds, None)
    quantize_static(str(fp32_onnx), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range)
    return path


def nncf_quantize(fp32_onnx, batches, path):
    import nncf
    import openvino as ov
    model = ov.Core().read_model(str(fp32_onnx))
    quantized = nncf.quantize(model, nncf.Dataset(batches, lambda x: x.contiguous().numpy()),
                              subset_size=len(batches))
    ov.save_model(quantized, str(path))
    return path


def forms_of(files, sizes, threads):
    """{name: {batch: fn(x)}} for every (runtime, file) on `threads` threads."""
    forms = {}
    for label, (runtime, path) in files.items():
        if runtime == "onnxruntime":
            session = deploy.ort_session(path, threads)
            run = lambda x, s=session: s.run(None, {"input": x.numpy()})[0]
            forms[label] = {b: run for b in sizes}
        else:
            forms[label] = {b: deploy.openvino_runner(deploy.openvino_compile(path, threads, b)[0]) for b in sizes}
    return forms


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a finished run's folder (report.json, fp32.onnx, int8.onnx)")
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DIR"), help="default: the run's")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--runs", type=int, default=50)
    a = p.parse_args()
    run_dir = Path(a.run_dir)
    r = json.loads((run_dir / "report.json").read_text())
    args = SimpleNamespace(**dict(r["args"], data_dir=a.data_dir or r["args"]["data_dir"]))
    torch.set_num_threads(args.threads)
    data = cifar.load_data(args)
    images, labels = data["test"]
    batches = data_module.calibration_batches(data["train"][0], args.batch_size, args.ptq_batches, args.seed)
    torch.backends.quantized.engine = models.ENGINE
    int8 = torch.jit.load(run_dir / "int8.pt")
    reference = deploy.predict_fixed_batch(lambda x: int8(x), images, 500)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"pipeline QAT int8.onnx, onnxruntime": ("onnxruntime", run_dir / "int8.onnx"),
                 "pipeline QAT int8.onnx, openvino": ("openvino", run_dir / "int8.onnx"),
                 "onnxruntime quantize_static, onnxruntime": (
                     "onnxruntime", ort_quantize_static(run_dir / "fp32.onnx", batches, Path(tmp) / "ort_ptq.onnx",
                                                        args.reduce_range)),
                 "nncf PTQ, openvino": ("openvino", nncf_quantize(run_dir / "fp32.onnx", batches,
                                                                  Path(tmp) / "nncf_ptq.xml")),
                 "fp32.onnx, onnxruntime": ("onnxruntime", run_dir / "fp32.onnx")}
        forms = {f"{name} ({n}t)": runs for n in sorted({args.threads, 1}, reverse=True)
                 for name, runs in forms_of(files, a.batch_sizes, n).items()}
        with torch.inference_mode():
            scores = {}
            for name, runs in forms.items():
                b = max(a.batch_sizes)
                preds = deploy.predict_fixed_batch(runs[b], images, b)
                scores[name] = (training.top1(preds, labels), training.top1(preds, reference))
            latency = {}
            for b in a.batch_sizes:
                x = torch.randn(b, 3, 32, 32)
                latency[b] = deploy.time_interleaved({n: (lambda run=runs[b]: run(x)) for n, runs in forms.items()},
                                                     10, a.runs, 5, 0.01)
    print(f"\n{r['model']} ({run_dir}), {report.platform_cpu()}, {torch.backends.cpu.get_cpu_capability()}, "
          f"PyTorch int8 top-1 {training.top1(reference, labels):.4f}; {len(batches)} calibration batches of "
          f"{args.batch_size}; median of {a.runs} calls in 5 rounds, all forms in turns; img/s/core = batch / "
          f"latency / threads\n")
    print("| form | top-1 | agreement with PyTorch int8 | "
          + " | ".join(f"batch {b} ms | batch {b} img/s/core" for b in a.batch_sizes) + " |")
    print("|---" * (3 + 2 * len(a.batch_sizes)) + "|")
    for name in forms:
        threads = int(name.rsplit("(", 1)[1].rstrip("t)"))
        cells = [f"{latency[b][name]['median']:.3f} | {b * 1000 / latency[b][name]['median'] / threads:.0f}"
                 for b in a.batch_sizes]
        print(f"| {name} | {scores[name][0]:.4f} | {scores[name][1]:.4f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
