"""How well --time-budget's pace probe predicts the training pace, for several probe lengths.

schedule.measure_pace (the probe --time-budget runs: PROBE_WARMUP untimed, then N timed float and QAT batches on
throwaway models) is run with each --probes length and with --reference batches, in turns (the order rotated every
round), for --rounds rounds. Each probe's error is taken against the reference of its own round, so a change of
the machine's pace between rounds is not counted as the probe's error.

    python benchmarks/pace_probe.py --model resnet18 --probes 20 60 --reference 200 --rounds 5
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cifar  # noqa: E402
import report  # noqa: E402
import schedule  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=list(cifar.DEFAULTS))
    p.add_argument("--probes", type=int, nargs="+", default=[20, 60], help="probe lengths in timed batches")
    p.add_argument("--reference", type=int, default=200, help="timed batches of the reference measurement")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    args = cifar.parse_args(["--model", a.model])
    torch.set_num_threads(args.threads)
    data = cifar.load_data(args)
    lengths = [*a.probes, a.reference]
    print(f"{report.platform_cpu()}, capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, "
          f"{a.model} batch {args.batch_size}, {schedule.PROBE_WARMUP} untimed batches first")
    paces = {n: [] for n in lengths}
    for r in range(a.rounds):
        for n in lengths[r % len(lengths):] + lengths[:r % len(lengths)]:
            schedule.PROBE_BATCHES = {"fp32": n, "qat": n}
            paces[n].append(schedule.measure_pace(args, data, torch.device("cpu")))
        print(f"round {r + 1}: " + "  ".join(f"{n} batches fp32 {paces[n][-1]['fp32']:.0f} qat "
                                             f"{paces[n][-1]['qat']:.0f}" for n in lengths), flush=True)
    print(f"\nimg/s, median [min-max] over {a.rounds} rounds; error: probe / reference of the same round - 1")
    for stage in ("fp32", "qat"):
        ref = [q[stage] for q in paces[a.reference]]
        for n in lengths:
            v = [q[stage] for q in paces[n]]
            line = f"{stage:4} {n:4} batches: {statistics.median(v):6.0f} [{min(v):.0f}-{max(v):.0f}]"
            if n != a.reference:
                err = [x / y - 1 for x, y in zip(v, ref)]
                line += (f"  error median {statistics.median(err):+.1%}, range {min(err):+.1%} to {max(err):+.1%},"
                         f" largest |error| {max(map(abs, err)):.1%}")
            print(line)


if __name__ == "__main__":
    main()
