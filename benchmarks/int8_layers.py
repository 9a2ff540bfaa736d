"""Where int8 gains over fp32 on this CPU: every conv/linear layer timed alone, then the whole model per engine.

Each quantized layer of the converted model (fbgemm) is timed on its real input shape against the same fused
fp32 layer in cifar.py's fastest fp32 form (frozen TorchScript after optimize_for_inference, NCHW or
channels_last, the faster kept); the sums by kind (1x1, depthwise, full 3x3, ...) show which layers hold back the
whole-model speed-up. Weights are random (speed does not depend on their values); the int8 model is calibrated on
random inputs. The whole int8 model is then timed under each quantized engine against the fastest fp32 form.
Medians in ms; both sides of each ratio are timed in alternating rounds, in one process.

    python benchmarks/int8_layers.py --model mobilenet_v2 --batch-size 64 [--per-layer]
"""
import argparse
import copy
import io
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.ao.nn.quantized as nnq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deploy  # noqa: E402
import models  # noqa: E402

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")


def fastest_fp32(layer, x):
    """deploy.fp32_candidates' optimized TorchScript forms of one layer; the faster on x (NCHW vs channels_last)."""
    forms = []
    for fmt in (torch.contiguous_format, torch.channels_last) if x.dim() == 4 else (torch.contiguous_format,):
        m = copy.deepcopy(layer).eval().to(memory_format=fmt)
        xf = x.contiguous(memory_format=fmt)
        ts = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(m, xf)))
        forms.append((deploy.time_it(lambda: ts(xf), 5, 20)["median"], lambda ts=ts, xf=xf: ts(xf)))
    return min(forms, key=lambda f: f[0])[1]


def in_turns(fns, rounds, runs):
    """Median ms of each callable, timed in alternating rounds so that machine drift hits all alike."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for t, fn in zip(times, fns):
            t.append(deploy.time_it(fn, 2, runs)["median"])
    return [float(np.median(t)) for t in times]


def kind(layer):
    if isinstance(layer, nnq.Linear):
        return "linear"
    k = layer.kernel_size[0]
    return f"depthwise {k}x{k}" if layer.groups == layer.in_channels > 1 else f"{k}x{k}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2", choices=list(models.ARCHS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per comparison")
    p.add_argument("--per-layer", action="store_true", help="print every layer, not only the sums by kind")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32)

    fp32_model = models.create_model(args.model).eval()
    fused = copy.deepcopy(fp32_model)
    fused.fuse_model(is_qat=False)  # the fp32 counterpart of each fused int8 layer (conv+bn+relu -> one conv)
    observed = models.prepare_quantization(copy.deepcopy(fp32_model), qat=False)
    with torch.no_grad():
        observed(x)
    int8_model = models.convert_int8(observed)

    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0]))
             for n, m in int8_model.named_modules() if isinstance(m, (nnq.Conv2d, nnq.Linear))]
    with torch.inference_mode():
        int8_model(x)
    for h in hooks:
        h.remove()

    print(f"{args.model}, batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}, "
          f"int8 engine {models.ENGINE}; median ms of {args.rounds} alternating rounds")
    by_kind = defaultdict(lambda: np.zeros(3))  # fp32 ms, int8 ms, MMAC
    with torch.inference_mode():
        for name, qx in inputs.items():
            q_layer, f_layer = int8_model.get_submodule(name), fused.get_submodule(name)
            fp32_fn = fastest_fp32(f_layer, qx.dequantize())
            fp32_ms, int8_ms = in_turns([fp32_fn, lambda: q_layer(qx)], args.rounds, 10)
            out = q_layer(qx)
            w = q_layer.weight()
            mmac = out.numel() * w[0].numel() / 1e6
            by_kind[kind(q_layer)] += (fp32_ms, int8_ms, mmac)
            if args.per_layer:
                print(f"  {name:28s} {kind(q_layer):13s} {str(tuple(qx.shape)):18s} -> {str(tuple(out.shape)):18s}"
                      f" fp32 {fp32_ms:7.3f} int8 {int8_ms:7.3f} ({fp32_ms / int8_ms:.2f}x)")
    total = sum(by_kind.values())
    print(f"{'layers':14s} {'MMAC':>8s} {'fp32 ms':>8s} {'int8 ms':>8s} {'speed-up':>8s} {'int8 time':>9s}"
          f" {'int8 GMAC/s':>11s}")
    for k, (f, q, mmac) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]) + [("all, summed", total)]:
        print(f"{k:14s} {mmac:8.1f} {f:8.2f} {q:8.2f} {f / q:7.2f}x {q / total[1]:9.0%} {mmac / q:11.1f}")

    # The whole model: int8 TorchScript repacked under each engine (TorchScript re-packs weights when loaded).
    buffer = io.BytesIO()
    torch.jit.save(models.to_torchscript(int8_model), buffer)
    fp32_forms = deploy.fp32_candidates(fp32_model)
    with torch.inference_mode():
        best = min(fp32_forms, key=lambda f: deploy.time_it(lambda: fp32_forms[f](x), 3, 10)["median"])
        for engine in ("fbgemm", "x86", "onednn"):
            torch.backends.quantized.engine = engine
            buffer.seek(0)
            int8_ts = torch.jit.load(buffer)
            fp32_ms, int8_ms = in_turns([lambda: fp32_forms[best](x), lambda: int8_ts(x)], args.rounds, 5)
            print(f"whole model, int8 on {engine:6s}: fp32 ({best}) {fp32_ms:7.2f} int8 {int8_ms:7.2f}"
                  f" ({fp32_ms / int8_ms:.2f}x)")


if __name__ == "__main__":
    main()
