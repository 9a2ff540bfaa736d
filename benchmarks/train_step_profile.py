"""Where a float (--qat: QAT) training step spends its time, layer by layer, and oneDNN's convolutions against
PyTorch's native ones.

For every convolution of the model (its input shape taken from a real forward pass in channels_last, as cifar.py
trains) the forward + backward pass of that layer alone is timed with oneDNN (torch's default on x86) and with
oneDNN disabled (PyTorch's native im2col + BLAS kernels) and, where a kernel reaches into the zero padding only,
with those taps cut (training.dead_taps_cut, as cifar.py's float and QAT training run), all in turns over --rounds
rounds, median per round. Then the whole training step (forward, backward, SGD) the three ways, in turns, and the step's
top operators from torch.profiler (plain oneDNN).

To see what the same CPU does with AVX2 alone (the ISA of the slower machines), cap the ISA of ATen, oneDNN and
MKL before the process starts:

    python benchmarks/train_step_profile.py --model resnet18
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/train_step_profile.py --model resnet18
"""
import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cifar  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402
import training  # noqa: E402

BACKENDS = {"onednn": True, "native": False}  # torch.backends.mkldnn enabled?


def in_turns(fns, rounds, number):
    """Median seconds per call of each {name: (fn, mkldnn_enabled)}, the names taken in turns in every round."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, enabled) in fns.items():
            torch.backends.mkldnn.enabled = enabled
            timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())  # Timer's default: 1
            times[name].append(timer.timeit(number).mean)
    torch.backends.mkldnn.enabled = True
    return {name: statistics.median(t) for name, t in times.items()}


def conv_inputs(model, batch_size):
    """[(name, conv, input shape)] for every Conv2d, in the order a forward pass reaches them."""
    found, hooks = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda m, x, y, name=name: found.append((name, m, x[0].shape))))
    with torch.no_grad():
        model(torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    return found


def layer_step(conv, shape, first):
    """One forward + backward pass of conv (a module or function) alone on a random input of shape (channels_last)."""
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(not first)
    grad = None

    def step():
        nonlocal grad
        y = conv(x)
        if grad is None:
            grad = torch.randn_like(y)
        y.backward(grad)
    return step


def model_step(model, batch_size):
    """One training step (forward, loss, backward, SGD) of model on a fixed random batch."""
    optimizer, criterion = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), nn.CrossEntropyLoss()
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))

    def step():
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=list(models.ARCHS))
    p.add_argument("--batch-size", type=int, default=None, help="default: cifar.py's for --model")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=5, help="rounds, both backends in turn in each")
    p.add_argument("--number", type=int, default=3, help="calls per backend per round (after one untimed)")
    p.add_argument("--qat", action="store_true", help="the QAT model (fused, fake-quantized), as cifar.py's QAT stage")
    args = p.parse_args()
    bs = args.batch_size or cifar.DEFAULTS[args.model]["batch_size"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    limits = " ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                       "MKL_ENABLE_INSTRUCTIONS") if k in os.environ)
    print(f"{report.platform_cpu()}, capability {torch.backends.cpu.get_cpu_capability()} {limits or '(no ISA cap)'}, "
          f"{args.threads} threads, torch {torch.__version__}, {args.model} {'QAT' if args.qat else 'float'}, "
          f"batch {bs}, median of {args.rounds} rounds x {args.number} calls, backends in turn")

    model = models.create_model(args.model)
    if args.qat:
        for m in model.modules():  # zero-initialised BN weights would make fake quantization divide by 0
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
        models.prepare_quantization(model, qat=True)
    model = model.to(memory_format=torch.channels_last).train()
    layers = conv_inputs(model, bs)
    print(f"\n{'layer':28s} {'conv':>24s} {'map':>5s} {'MMAC/img':>8s}  {'onednn ms':>9s} {'native ms':>9s} "
          f"{'native/onednn':>13s}  onednn GFLOP/s  {'cut ms':>10s}")
    by_map, total = {}, {name: 0.0 for name in (*BACKENDS, "cut")}
    for i, (name, conv, shape) in enumerate(layers):
        fn = layer_step(conv, shape, first=i == 0)
        fn()
        fns = {b: (fn, enabled) for b, enabled in BACKENDS.items()}
        cut_conv = copy.deepcopy(conv)
        with training.dead_taps_cut(cut_conv, torch.zeros(1, *shape[1:])) as cut:
            if cut:
                fns["cut"] = (layer_step(cut_conv, shape, first=i == 0), True)
                fns["cut"][0]()
            t = in_turns(fns, args.rounds, args.number)
        t.setdefault("cut", t["onednn"])
        out_hw = (shape[2] + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        macs = out_hw ** 2 * conv.out_channels * conv.in_channels // conv.groups * conv.kernel_size[0] ** 2
        flops = 3 * 2 * macs * bs  # forward, grad input, grad weight
        kind = (f"{conv.in_channels}->{conv.out_channels} {conv.kernel_size[0]}x{conv.kernel_size[0]}"
                f"{'/' + str(conv.stride[0]) if conv.stride[0] > 1 else ''}{' dw' if conv.groups > 1 else ''}")
        print(f"{name:28s} {kind:>24s} {shape[2]:>3d}^2 {macs / 1e6:8.2f}  {t['onednn'] * 1e3:9.2f} "
              f"{t['native'] * 1e3:9.2f} {t['native'] / t['onednn']:12.2f}x  {flops / t['onednn'] / 1e9:8.1f}  {t['cut'] * 1e3:10.2f}")
        row = by_map.setdefault(shape[2], dict(macs=0, **{b: 0.0 for b in (*BACKENDS, "cut")}))
        row["macs"] += macs
        for b in (*BACKENDS, "cut"):
            row[b] += t[b]
            total[b] += t[b]
    print(f"\nper input map size: share of the summed conv forward+backward time (onednn), native/onednn")
    for hw, row in sorted(by_map.items(), reverse=True):
        print(f"  {hw:2d}x{hw:<2d}: {row['macs'] / 1e6:7.1f} MMAC/img, {row['onednn'] / total['onednn']:5.1%} of the "
              f"time, {row['onednn'] * 1e3:7.1f} ms onednn, {row['native'] * 1e3:7.1f} ms native "
              f"({row['native'] / row['onednn']:.2f}x), {row['cut'] * 1e3:7.1f} ms cut")

    steps = {b: (model_step(model, bs), enabled) for b, enabled in BACKENDS.items()}
    cut_model = copy.deepcopy(model)
    with training.dead_taps_cut(cut_model, torch.zeros(1, 3, 32, 32)):  # as cifar.py's float and QAT training
        steps["cut"] = (model_step(cut_model, bs), True)
        for fn, enabled in steps.values():
            torch.backends.mkldnn.enabled = enabled
            fn()
        t = in_turns(steps, args.rounds, args.number)
    step = steps["onednn"][0]
    print(f"\nwhole training step, batch {bs}: " + ", ".join(f"{b} {t[b] * 1e3:.1f} ms ({bs / t[b]:.0f} img/s, "
          f"{t['onednn'] / t[b]:.2f}x onednn's speed)" for b in steps)
          + f"; convolutions alone (summed above): {total['onednn'] * 1e3:.1f} ms onednn = "
          f"{total['onednn'] / t['onednn']:.0%} of the step")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.number):
            step()
    print(f"\ntop operators of {args.number} steps (onednn), self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
