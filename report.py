"""What a run reports: the environment (CPU, capability, versions), report.json and report.md, the PNG plots, and the
console's summary, deploy matrix and recommendation lines. The figures come from the stages in cifar.py."""
import importlib.metadata
import os
import platform
from pathlib import Path

import torch

import utils


# ---------------------------------------------------------------- environment

def environment(threads):
    import onnx
    import onnxruntime
    import torchvision
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None
    return dict(torch=torch.__version__, torchvision=torchvision.__version__, onnx=onnx.__version__,
                onnxruntime=onnxruntime.__version__, openvino=version("openvino"), torchao=version("torchao"),
                onnxscript=version("onnxscript"), threads=threads, cores=os.cpu_count(),
                quantized_engine=torch.backends.quantized.engine, cpu=platform_cpu(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), vnni=cpu_has_vnni(),
                python=platform.python_version())


def cpuinfo_field(name, cpuinfo="/proc/cpuinfo"):
    """The value of the first `name` line of /proc/cpuinfo, or None where there is none (not Linux, ARM fields)."""
    try:
        line = next(l for l in Path(cpuinfo).read_text().splitlines() if l.split(":")[0].strip() == name)
    except (OSError, StopIteration):
        return None
    return line.split(":", 1)[1].strip()


def cpu_has_vnni(cpuinfo="/proc/cpuinfo"):
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI): they decide which int8 kernels
    win. None where cpuinfo cannot say."""
    flags = cpuinfo_field("flags", cpuinfo)
    return None if flags is None else bool({"avx512_vnni", "avx_vnni"} & set(flags.split()))


def platform_cpu():
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


# ---------------------------------------------------------------- report.json and report.md

WORST_LAYERS = 5  # report.md lists this many of each method's layers, lowest SQNR first


def save_report(report, out, plots=False):
    """report.json, report.md and (at the end) the PNG plots, each written atomically."""
    out = Path(out)
    if plots and report["history"]:
        plot_curves(report["history"], out / "training_curves.png")
        report["artifacts"]["training_curves"] = "training_curves.png"
    if plots and report.get("layer_sqnr"):
        plot_layer_sqnr(report["layer_sqnr"], out / "layer_sqnr.png")
        report["artifacts"]["layer_sqnr_plot"] = "layer_sqnr.png"
    if plots and report.get("deploy"):
        plot_deploy(report["deploy"], out / "latency.png")
        report["artifacts"]["latency_plot"] = "latency.png"
    utils.save_json(report, out / "report.json")
    utils.save_text(report_markdown(report), out / "report.md")


def report_markdown(r):
    """report.json as readable tables."""
    acc, sizes = r["accuracy"], [str(b) for b in r["args"]["bench_batch_sizes"]]
    flow, bits = r.get("flow", "eager"), lambda key: 7 if r["args"].get(key, True) else 8
    activations = (f"{bits('reduce_range')}-bit activations" if flow == "eager" else
                   f"PT2E {bits('pt2e_reduce_range')}-bit activations" if flow == "pt2e" else
                   f"{bits('reduce_range')}-bit activations (PT2E {bits('pt2e_reduce_range')}-bit)")
    lines = [f"# {r['model']} on CIFAR-10: float, QAT int8, ONNX", "",
             f"{r['epochs']} float epochs + {r['qat_epochs']} QAT epochs ({flow} flow) of "
             f"{r['args']['qat_batches'] or 'all'} batches on {r['device']}, {r.get('weight_bits', 8)}-bit weights, "
             f"{activations}; torch {r['environment']['torch']}, {r['environment']['threads']} threads, "
             f"{r['environment']['cpu']}", "",
             "| model | top-1 | file (bytes) |", "|---|---|---|"]
    names = [("fp32", "fp32", "fp32"), ("PTQ int8", "ptq_int8", None), ("QAT fake-quant", "qat_fake_quant", None),
             ("QAT int8", "int8", "int8"), ("fp32 ONNX", "fp32_onnx", "fp32_onnx"),
             ("int8 ONNX", "int8_onnx", "int8_onnx"),
             ("int8 ONNX, weights stored in 4 bits", "int8_w4_onnx", "int8_w4_onnx"),
             ("PT2E PTQ int8", "pt2e_ptq_int8", None), ("PT2E QAT fake-quant", "pt2e_qat_fake_quant", None),
             ("PT2E QAT int8 (AOTInductor file)", "pt2e_int8", "pt2e_int8"),
             ("PT2E int8 ONNX", "pt2e_int8_onnx", "pt2e_int8_onnx")]
    for label, key, size in names:
        if key in acc:
            lines.append(f"| {label} | {acc[key]:.4f} | {r['model_size_bytes'].get(size, '')} |")
    if "qat_vs_ptq" in r:
        lines += ["", f"QAT int8 - PTQ int8: {r['qat_vs_ptq']:+.2f} points (one seed; README: QAT or PTQ for the "
                      f"seed spread)"]
    if "pt2e_vs_eager" in r:
        lines += ["", f"PT2E QAT int8 - eager QAT int8: {r['pt2e_vs_eager']:+.2f} points (one seed; "
                      f"benchmarks/README.md: flows.py for the seed spread)"]
    if r.get("agreement"):
        lines += ["", "| agreement (same predicted class) | share of test images |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in r["agreement"].items()]
    if r.get("layer_sqnr"):
        lines += ["", f"Per-layer quantization error: SQNR (dB) of each int8 conv/linear output against its own float "
                  f"counterpart (PTQ: the BN-folded float model; QAT: the QAT model without fake quantization; PT2E_*: the "
                  f"same, from the exported graphs), on "
                  f"{r['layer_sqnr_images']} test images; the {WORST_LAYERS} worst layers (layer_sqnr.png: all)", ""]
        worst = [[method.upper(), row["layer"], f"{row['sqnr_db']:.1f}"] for method, rows in r["layer_sqnr"].items()
                 for row in sorted(rows, key=lambda row: row["sqnr_db"])[:WORST_LAYERS]]
        lines += markdown_table([["method", "layer", "SQNR dB"], *worst])
    if r.get("qat_drift_sqnr"):
        drift = sorted(row["sqnr_db"] for row in r["qat_drift_sqnr"])
        lines += ["", f"QAT's own drift (not quantization error): the QAT model's float network against the float "
                      f"model before QAT, SQNR {drift[len(drift) // 2]:.1f} dB median, {drift[0]:.1f} dB worst layer"]
    if r.get("deploy"):
        ds = r["deploy_settings"]
        lines += ["", f"Deployment matrix: latency in ms per batch, median (p90) of {ds['runs']} calls in "
                  f"{ds['rounds']} interleaved rounds after {ds['warmup']} warm-up calls, each form on {ds['threads']} "
                  f"threads and (*_1thread) on 1; images per second per core = batch / median / threads; "
                  f"top-1 and agreement (same class as the reference: int8 {ds['references']['int8']}, pt2e_int8 "
                  f"{ds['references'].get('int8_pt2e')}, otherwise {ds['references']['fp32']}) on {ds['images']} "
                  f"test images", ""]
        lines += markdown_table(deploy_rows(r, p90=True))
        lines += ["", *[f"- {line}" for line in recommendation_lines(r)]]
        lines += [f"- note: {n}" for n in r.get("deploy_notes", [])]
        lines += ["", "| speed-up | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
        lines += [f"| {k} | " + " | ".join(f"{v[b]:.2f}x" if b in v else "-" for b in sizes) + " |"
                  for k, v in r["speedup"].items()]
    if r.get("history"):
        lines += ["", "| stage | epoch | loss | train acc | test acc | img/s | data share | s |", "|---" * 8 + "|"]
        lines += [f"| {h['stage']} | {h['epoch']} | {h['loss']:.4f} | {h['train_acc']:.4f} | {h['test_acc']:.4f} "
                  f"| {h['images_per_s']:.0f} | {h['data_share']:.1%} | {h['seconds']:.0f} |" for h in r["history"]]
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items())]
    return "\n".join(lines) + "\n"


def deploy_rows(r, p90=False):
    """The deployment matrix as rows of strings, header first."""
    sizes = [str(b) for b in r["args"]["bench_batch_sizes"]]
    ms = lambda v: "-" if v is None else f"{v['median']:.3f}" + (f" ({v['p90']:.3f})" if p90 else "")
    per_core = lambda v: "-" if v is None else f"{v:.0f}"
    rows = [["form", "engine", "precision", "threads", *[f"batch {b} ms" for b in sizes],
             *[f"batch {b} img/s/core" for b in sizes], "top-1", "agreement", "verified"]]
    for f in r["deploy"]:
        rows.append([f["name"], f["engine"] or "-", f["precision"], str(f["threads"]),
                     *[ms(f["latency_ms"].get(b)) for b in sizes],
                     *[per_core(f["images_per_s_per_core"].get(b)) for b in sizes],
                     "-" if f["top1"] is None else f"{f['top1']:.4f}",
                     "-" if f["agreement"] is None else f"{f['agreement']:.4f}",
                     "yes" if f["verified"] else f"no: {f['note']}"])
    return rows


def markdown_table(rows):
    return ["| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|",
            *["| " + " | ".join(row) + " |" for row in rows[1:]]]


def recommendation_lines(r):
    """Two lines per batch size: the fastest verified int8 and fp32 forms (latency) and the verified forms that
    serve the most images per second per core, each pair with its ratio."""
    lines = []
    for b in r.get("recommended", {}):
        latency = {f["name"]: f["latency_ms"][b]["median"] for f in r["deploy"] if b in f["latency_ms"]}
        per_core = {f["name"]: f["images_per_s_per_core"][b] for f in r["deploy"] if b in f["latency_ms"]}
        for kind, pick, ratio, show, gain in (
                ("recommended", r["recommended"][b], "best_int8_vs_best_fp32", lambda n: f"{latency[n]:.3f} ms",
                 "faster than the best fp32"),
                ("per core", r.get("recommended_per_core", {}).get(b, {}), "per_core_best_int8_vs_best_fp32",
                 lambda n: f"{per_core[n]:.0f} img/s/core", "the images per core of the best fp32")):
            parts = [f"{p} {pick[p]} ({show(pick[p])})" if p in pick else f"no verified {p} form"
                     for p in ("int8", "fp32")]
            x = r["speedup"].get(ratio, {}).get(b)
            lines.append(f"{kind} at batch {b}: {parts[0]}, {parts[1]}" + (f": int8 {x:.2f}x {gain}" if x else ""))
    return lines


# ---------------------------------------------------------------- plots

def plot_curves(history, path):
    """Loss and test accuracy per epoch, float then QAT."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in ("fp32", "qat", "qat_pt2e"):
        rows = [(i + 1, h) for i, h in enumerate(history) if h["stage"] == stage]
        if rows:
            x = [i for i, _ in rows]
            ax1.plot(x, [h["loss"] for _, h in rows], "o-", label=f"{stage} train loss")
            ax2.plot(x, [h["test_acc"] for _, h in rows], "o-", label=f"{stage} test top-1")
            ax2.plot(x, [h["train_acc"] for _, h in rows], "--", label=f"{stage} train top-1")
    for ax, title in ((ax1, "loss"), (ax2, "accuracy")):
        ax.set_xlabel("epoch (float, then QAT)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_deploy(deploy, path):
    """Latency of every form at each batch size, fastest first; unverified forms hatched."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = sorted({b for f in deploy for b in f["latency_ms"]}, key=int)
    colors = {"int8": "tab:blue", "fp32": "tab:orange", "bf16": "tab:green"}
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 0.8 + 0.3 * len(deploy)), squeeze=False)
    for ax, b in zip(axes[0], sizes):
        rows = sorted((f for f in deploy if b in f["latency_ms"]), key=lambda f: f["latency_ms"][b]["median"])
        values = [f["latency_ms"][b]["median"] for f in rows]
        ax.barh([f["name"] for f in rows], values, color=[colors.get(f["precision"], "grey") for f in rows])
        for i, (f, v) in enumerate(zip(rows, values)):
            if not f["verified"]:
                ax.patches[i].set_hatch("//")
            ax.text(v, i, f" {v:.2f}" + ("" if f["verified"] else " (unverified)"), va="center", fontsize=8)
        ax.set_xlabel("ms per batch (median)")
        ax.set_title(f"batch {b} (blue int8, orange fp32, green bf16)", fontsize=10)
        ax.invert_yaxis()
        ax.set_xlim(0, max(values) * 1.35)
    fig.tight_layout()
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_layer_sqnr(layer_sqnr, path):
    """SQNR per quantized layer in network order, one line per method (PTQ, QAT)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = next(iter(layer_sqnr.values()))
    fig, ax = plt.subplots(figsize=(max(6, 0.16 * len(rows)), 4))
    for method, rows in layer_sqnr.items():
        ax.plot([row["sqnr_db"] for row in rows], "o-", ms=3, label=method.upper())
    ax.set_xticks(range(len(rows)), [row["layer"] for row in rows], rotation=90, fontsize=6)
    ax.set_ylabel("SQNR (dB) against the float model")
    ax.set_title("per-layer quantization error (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# ---------------------------------------------------------------- console

def summary(r):
    """The short console table: accuracy and file size of fp32, PTQ int8 and QAT int8, then speed-ups."""
    acc, size = r["accuracy"], r["model_size_bytes"]
    rows = [("fp32", acc.get("fp32"), size.get("fp32")), ("PTQ int8", acc.get("ptq_int8"), None),
            ("QAT int8", acc.get("int8"), size.get("int8")), ("int8 ONNX", acc.get("int8_onnx"), size.get("int8_onnx")),
            ("4-bit ONNX", acc.get("int8_w4_onnx"), size.get("int8_w4_onnx")),
            ("PT2E PTQ", acc.get("pt2e_ptq_int8"), None), ("PT2E QAT", acc.get("pt2e_int8"), size.get("pt2e_int8")),
            ("PT2E ONNX", acc.get("pt2e_int8_onnx"), size.get("pt2e_int8_onnx"))]
    lines = [f"{'':10s} {'top-1':>7s} {'file MB':>8s}"]
    lines += [f"{n:10s} {a:7.4f} {(f'{s / 1e6:.2f}' if s else '-'):>8s}" for n, a, s in rows if a is not None]
    if "qat_vs_ptq" in r:
        lines.append(f"QAT int8 - PTQ int8: {r['qat_vs_ptq']:+.2f} points")
    if "pt2e_vs_eager" in r:
        lines.append(f"PT2E QAT int8 - eager QAT int8: {r['pt2e_vs_eager']:+.2f} points")
    for k, v in r.get("speedup", {}).items():
        lines.append(f"speed-up {k}: " + ", ".join(f"{x:.2f}x at batch {b}" for b, x in v.items()))
    return "\n".join(lines)


def deploy_table(r):
    """The deployment matrix for the console, in aligned columns."""
    rows = deploy_rows(r)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     + "  " + row[-1] for row in rows)
