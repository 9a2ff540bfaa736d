"""Eager against PT2E QAT from the same float weights, over seeds: int8 test top-1 mean and range, QAT images/s.

For every seed both flows fine-tune one float model (a run's fp32.pt) with cifar.py's own stages and the recipe's
defaults (the seed sets batch order, crops and dropout), in turn, and convert: eager mode's fbgemm int8 model and
PT2E's int8 reference (the graph the AOTInductor package and int8_pt2e.onnx are made from). Prints one line per
run and a Markdown table; writes every figure to a JSON file.

    python benchmarks/flows.py --model mobilenet_v2 --fp32 save_models/mobilenet_v2/fp32.pt
"""
import json
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
import pt2e  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from qat_vs_ptq import float_run_parser, load_float_run, spread  # noqa: E402


def fine_tune(flow, fp32_model, data, args):
    """(int8 top-1, QAT images/s, seconds of QAT and conversion) of one flow."""
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:  # the QAT stages checkpoint each epoch; nothing of it is kept
        if flow == "eager":
            qat_model, history = eager.train_qat(fp32_model, [], data, args, torch.device("cpu"), Path(out))
            int8 = eager.quantize_int8(qat_model, args)[0]
        else:
            qat_model, history = pt2e.train_qat(fp32_model, [], data, args, torch.device("cpu"), Path(out))
            int8 = pt2e.convert(qat_model)
    seconds = time.perf_counter() - start
    pace = statistics.mean(h["images_per_s"] for h in history)
    return training.accuracy(int8, data["test"]), pace, seconds


def main():
    a = float_run_parser(__doc__, "flows").parse_args()
    output = Path(a.output or ROOT / "save_models" / f"flows_{a.model}.json")
    fp32_path, argv, args, data, fp32_model, fp32, env = load_float_run(a, "--flow", "both")
    print(f"activations: eager {7 if args.reduce_range else 8}-bit, PT2E {7 if args.pt2e_reduce_range else 8}-bit")
    results = dict(model=a.model, fp32_state_dict=str(fp32_path), fp32=fp32, seeds=a.seeds, environment=env,
                   qat_settings=training.stage_settings(args)["qat"], test_images=len(data["test"][1]), runs=[])
    for seed in a.seeds:
        args = cifar.parse_args([*argv, "--seed", str(seed)])
        for flow in ("eager", "pt2e"):
            top1, pace, seconds = fine_tune(flow, fp32_model, data, args)
            results["runs"].append(dict(seed=seed, flow=flow, int8=top1, qat_images_per_s=pace, seconds=seconds))
            print(f"seed {seed} {flow:5s}: int8 {top1:.4f}  QAT {pace:.0f} img/s  {seconds:.0f} s", flush=True)
    for flow in ("eager", "pt2e"):
        runs = [r for r in results["runs"] if r["flow"] == flow]
        results[flow] = dict(int8=spread([r["int8"] for r in runs]),
                             qat_images_per_s=spread([r["qat_images_per_s"] for r in runs]))
    diff = [100 * (p["int8"] - e["int8"]) for e, p in zip(results["runs"][::2], results["runs"][1::2])]
    results["pt2e_minus_eager"] = spread(diff)
    utils.atomic_write(output, lambda f: f.write(json.dumps(results, indent=1).encode()))
    cell = lambda s, f="{:.4f}": f"{f.format(s['mean'])} ({f.format(s['min'])}-{f.format(s['max'])})"
    print("\n| model | fp32 | eager QAT int8 mean (range) | PT2E QAT int8 mean (range) | PT2E - eager, points "
          "| QAT img/s eager / PT2E |")
    print("|---|---|---|---|---|---|")
    print(f"| {a.model} | {fp32:.4f} | {cell(results['eager']['int8'])} | {cell(results['pt2e']['int8'])} | "
          f"{cell(results['pt2e_minus_eager'], '{:+.2f}')} | {results['eager']['qat_images_per_s']['mean']:.0f} / "
          f"{results['pt2e']['qat_images_per_s']['mean']:.0f} |")
    print(f"{len(a.seeds)} seeds ({', '.join(map(str, a.seeds))}); wrote {output}")


if __name__ == "__main__":
    main()
