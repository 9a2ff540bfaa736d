"""Test top-1 against wall-clock minutes, from the report.json of one or more runs, in one PNG.

Each epoch's point sits at the time its evaluation ended (float epochs, then QAT epochs); the star is the
converted int8 model at the end of the whole run (ONNX and benchmark included).

    python benchmarks/accuracy_vs_time.py save_models/*/report.json -o docs/accuracy_vs_time.png
"""
import argparse
import itertools
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("reports", nargs="+", help="report.json files")
    p.add_argument("-o", "--output", default="accuracy_vs_time.png")
    args = p.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path in args.reports:
        with open(path) as f:
            r = json.load(f)
        minutes = [m / 60 for m in itertools.accumulate(h["seconds"] for h in r["history"])]
        line, = ax.plot(minutes, [h["test_acc"] for h in r["history"]], "o-", label=f"{r['model']} (float, QAT)")
        qat = [(t, h["test_acc"]) for t, h in zip(minutes, r["history"]) if h["stage"] == "qat"]
        if qat:
            ax.plot(*zip(*qat), "s", color=line.get_color(), mfc="white")
        total = sum(r["seconds"].values()) / 60
        ax.plot(total, r["accuracy"]["int8"], "*", ms=14, color=line.get_color(),
                label=f"{r['model']} int8: {r['accuracy']['int8']:.4f} at {total:.0f} min")
    ax.set_xlabel("wall-clock minutes (2 CPU cores)")
    ax.set_ylabel("test top-1")
    ax.set_title("CIFAR-10 test accuracy during the default run (squares: QAT epochs)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
