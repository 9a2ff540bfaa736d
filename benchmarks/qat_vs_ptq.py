"""QAT against PTQ from the same float weights, over seeds and weight bit widths: test top-1 mean and range.

For every bit width and seed, PTQ calibrates on that seed's training batches and QAT fine-tunes with that seed
(batch order, crops, Cutout, dropout), both with cifar.py's own functions and the recipe's defaults, from one
float model (a run's fp32.pt). The spread is therefore that of the quantization stages, not of float training.
Prints one line per run and a Markdown table; writes every figure to a JSON file.

    python benchmarks/qat_vs_ptq.py --model mobilenet_v2 --fp32 save_models/mobilenet_v2/fp32.pt
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cifar  # noqa: E402
import eager  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402


def quantize(fp32_model, data, argv, seed, bits):
    """(PTQ int8 top-1, QAT int8 top-1, QAT seconds) of one seed and bit width."""
    args = cifar.parse_args([*argv, "--seed", str(seed), "--weight-bits", str(bits)])
    ptq = training.accuracy(eager.calibrate_ptq(fp32_model, data, args), data["test"])
    torch.manual_seed(seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:  # train_qat checkpoints each epoch; nothing of it is kept
        qat_model, _ = eager.train_qat(fp32_model, [], data, args, torch.device("cpu"), Path(out))
    qat_s = time.perf_counter() - start
    qat = training.accuracy(eager.quantize_int8(qat_model, args)[0], data["test"])
    return ptq, qat, qat_s


def float_run_parser(doc, name):
    """The options of a benchmark that quantizes one float model over seeds."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "resnet18"])
    p.add_argument("--fp32", help="float state dict (default: save_models/<model>/fp32.pt)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DIR", "data"))
    p.add_argument("--test-subset", type=int, default=0, help="test images (0: all)")
    p.add_argument("-o", "--output", help=f"JSON results (default: save_models/{name}_<model>.json)")
    return p


def load_float_run(a, *extra):
    """The benchmark's common start, from its arguments a (model, fp32, data_dir, test_subset): cifar.py's argv and
    args with the float model as --float-checkpoint, the data, the float model, its test top-1 and the environment.
    Prints one line naming them."""
    fp32_path = Path(a.fp32 or ROOT / "save_models" / a.model / "fp32.pt")
    argv = ["--model", a.model, "--data-dir", a.data_dir, "--float-checkpoint", str(fp32_path),
            "--test-subset", str(a.test_subset), *extra]
    args = cifar.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = models.ENGINE
    data = cifar.load_data(args)
    fp32_model = models.create_model(a.model)
    fp32_model.load_state_dict(training.load_state_dict(fp32_path, fp32_model))
    env = report.environment(args.threads)
    fp32 = training.accuracy(fp32_model, data["test"])
    print(f"{a.model} from {fp32_path}: fp32 {fp32:.4f}; {env['cpu']} ({env['cpu_capability']}), "
          f"{args.threads} threads; QAT {args.qat_epochs} x {args.qat_batches} batches of {args.batch_size}")
    return fp32_path, argv, args, data, fp32_model, fp32, env


def spread(values):
    return dict(mean=statistics.mean(values), min=min(values), max=max(values), runs=values)


def verdict(r):
    """A gain only when the ranges over seeds do not overlap."""
    if r["qat"]["min"] > r["ptq"]["max"]:
        return "QAT gains"
    if r["ptq"]["min"] > r["qat"]["max"]:
        return "PTQ gains"
    return "within the seed spread"


def main():
    p = float_run_parser(__doc__, "qat_vs_ptq")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[8, 6, 4])
    a = p.parse_args()
    output = Path(a.output or ROOT / "save_models" / f"qat_vs_ptq_{a.model}.json")
    fp32_path, argv, args, data, fp32_model, fp32, env = load_float_run(a)
    results = dict(model=a.model, fp32_state_dict=str(fp32_path), fp32=fp32, seeds=a.seeds, environment=env,
                   qat_settings=training.stage_settings(args)["qat"], test_images=len(data["test"][1]), bits={})
    for bits in a.bits:
        runs = []
        for seed in a.seeds:
            ptq, qat, qat_s = quantize(fp32_model, data, argv, seed, bits)
            runs.append(dict(seed=seed, ptq=ptq, qat=qat, qat_seconds=qat_s))
            print(f"{bits}-bit weights, seed {seed}: PTQ {ptq:.4f}  QAT {qat:.4f}  "
                  f"(QAT - PTQ {100 * (qat - ptq):+.2f} points, QAT {qat_s:.0f} s)", flush=True)
        results["bits"][bits] = dict(ptq=spread([r["ptq"] for r in runs]), qat=spread([r["qat"] for r in runs]),
                                     qat_minus_ptq=spread([100 * (r["qat"] - r["ptq"]) for r in runs]), runs=runs)
        results["bits"][bits]["verdict"] = verdict(results["bits"][bits])
    utils.atomic_write(output, lambda f: f.write(json.dumps(results, indent=1).encode()))
    print("\n| weights | fp32 | PTQ int8 mean (range) | QAT int8 mean (range) | QAT - PTQ, points: mean (range) "
          "| verdict |")
    print("|---|---|---|---|---|---|")
    for bits, r in results["bits"].items():
        cell = lambda s, f="{:.4f}": f"{f.format(s['mean'])} ({f.format(s['min'])}-{f.format(s['max'])})"
        print(f"| {bits}-bit | {fp32:.4f} | {cell(r['ptq'])} | {cell(r['qat'])} | "
              f"{cell(r['qat_minus_ptq'], '{:+.2f}')} | {r['verdict']} |")
    print(f"{len(a.seeds)} seeds ({', '.join(map(str, a.seeds))}); wrote {output}")


if __name__ == "__main__":
    main()
