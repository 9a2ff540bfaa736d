"""CIFAR-10 quantization-aware training for CPU deployment, in eight stages (report.json's "seconds" keys):

1. data        CIFAR-10 as uint8 tensors (a folder, torchvision's files, or downloaded)
2. fp32_train  float training (SGD + nesterov, one-cycle LR)
3. qat_train   fuse, fbgemm fake quantization, QAT fine-tuning            (--flow eager, the default)
4. convert     int8 conversion, TorchScript (int8.pt)
5. ptq         post-training quantization baseline from the same float weights
   pt2e        --flow pt2e|both: the same QAT and PTQ in torchao's PT2E flow (pt2e.py), AOTInductor package
6. onnx        ONNX export, check, onnxsim, ONNX Runtime verification
7. deploy      every int8 and fp32 form in PyTorch (each quantized engine), ONNX Runtime and OpenVINO:
               verified on the test set, timed, the fastest verified recommended
8. report      report.json, report.md, plots

This file holds the command line, the recipe and the stages; their pieces live in one module per concern: data.py,
models.py, eager.py and pt2e.py (the two quantization flows), training.py, schedule.py (ETA, --time-budget), export.py
(ONNX), deploy.py, report.py, utils.py.

    python cifar.py                      # the full default pipeline for model_name
    python cifar.py --epochs 3 --qat-epochs 1 --train-subset 4000 --test-subset 1000   # quick tour
    torchrun --nproc-per-node 2 cifar.py ...   # float training and QAT on 2 processes (README: torchrun)
"""
import argparse
import contextlib
import copy
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import deploy
import eager
import export
import models
import pt2e
import schedule
import training
import utils
from data import DEFAULT_CACHE_DIR, Batches, balanced_subset, find_layout, load_cifar10, normalize
from report import deploy_table, environment, recommendation_lines, save_report, summary
from training import LOCAL_RANK, LOCAL_WORLD_SIZE, RANK, TORCHRUN, WORLD_SIZE  # torchrun's environment

model_name = "mobilenet_v2"  # or "resnet18"; --model overrides it

# The training recipe per model (--help shows it; flags override it). The epochs are sized for the whole default run
# to end within 45 (MobileNetV2) and 60 (ResNet18) minutes on 2 AVX2 cores; --time-budget sizes a run for any CPU.
# Evidence: docs/experiments.md.
DEFAULTS = {
    "mobilenet_v2": dict(
        epochs=11,          # 10 scored -0.7 point, 12 no better (held-out, 2 seeds)
        batch_size=64,      # +4.5 points over 128 at the same time per epoch
        lr=0.05,            # one-cycle peak; 0.025 and 0.1 did worse
        weight_decay=1e-3,  # +0.8 point over 5e-4 in 11 epochs (5 seeds, higher on each); 2e-3 worse (1 seed)
        crop_padding=2,     # a milder crop suits short training (+2 points over 4)
        cutout=0),
    "resnet18": dict(
        epochs=15,          # 18: +0.9 point held-out, +0.4 on test (2 seeds); its time on 2 AVX2 cores not yet measured
        batch_size=128,
        lr=0.1,
        weight_decay=1e-3,  # +0.8 point over 5e-4 in 15 epochs (2 seeds); 2e-3 no better
        crop_padding=2,     # 15 epochs underfit with 4 (train accuracy = held-out); 2: +0.5 point, 2 seeds
        cutout=0),          # Cutout (--cutout 8) pays only in long runs, which overfit without it (40 epochs)
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # per-model defaults (None here) are spelled out in the help text
        return action.help if action.default is None else super()._get_help_string(action)


def get_args_parser():
    per_model = lambda key: ", ".join(f"{v[key]} for {k}" for k, v in DEFAULTS.items())
    p = Parser(description="CIFAR-10 float training, QAT to int8, ONNX export and CPU benchmark",
               formatter_class=HelpFormatter)
    p.add_argument("--model", default=model_name, choices=list(models.ARCHS), help="network to train")
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DIR", "data"),
                   help="CIFAR-10 as torchvision's cifar-10-batches-py/ or train/<class>/*, test/<class>/* "
                        "($CIFAR10_DIR if set, else data); downloaded there when absent")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where decoded images are cached")
    p.add_argument("--out-dir", default="save_models", help="outputs go to OUT_DIR/<model>/")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="training device (auto: cuda when available); conversion and benchmarks use the CPU")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and augmentation")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() // LOCAL_WORLD_SIZE),
                   help="CPU threads per process for training and benchmarks (default: cores / processes per machine)")
    p.add_argument("--train-subset", type=int, default=0, help="train on a class-balanced subset (0: all)")
    p.add_argument("--test-subset", type=int, default=0, help="test on a class-balanced subset (0: all)")
    g = p.add_argument_group("float training")
    g.add_argument("--epochs", type=int, default=None, help=f"default: {per_model('epochs')}")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"training batch size (float and QAT); default: {per_model('batch_size')}")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate; default: {per_model('lr')}")
    g.add_argument("--weight-decay", type=float, default=None, help=f"default: {per_model('weight_decay')}")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (nesterov)")
    g.add_argument("--warmup-pct", type=float, default=0.15, help="share of the one-cycle schedule spent warming up")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    g.add_argument("--crop-padding", type=int, default=None,
                   help=f"random-crop padding in pixels (float and QAT); default: {per_model('crop_padding')}")
    g.add_argument("--cutout", type=int, default=None,
                   help=f"side in pixels of the Cutout square (float and QAT; 0: none); default: {per_model('cutout')}")
    g.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="choose the float epochs so that the whole run ends within this many minutes, from the "
                        "pace measured on the first batches (instead of --epochs)")
    g.add_argument("--float-checkpoint", default=None, help="start from this float state_dict; skip float training")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: batch-norm statistics of the global batch in float training (SyncBatchNorm)")
    p.add_argument("--debug", action="store_true", default=bool(os.environ.get("CIFAR_QAT_DEBUG")),
                   help="show the full traceback of a failure instead of one line (or set CIFAR_QAT_DEBUG=1)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/<model>/checkpoint.pt; finished training stages are reused")
    g = p.add_argument_group("quantization")
    g.add_argument("--flow", default="eager", choices=["eager", "pt2e", "both"],
                   help="eager: torch.ao eager mode (fbgemm, TorchScript); pt2e: torchao's PT2E "
                        "(X86InductorQuantizer, AOTInductor); both: each from the same float model, side by side")
    # Short QAT epochs, as in PyTorch's QAT tutorial: fine-tuning at 1/100 of the LR needs few steps, and a whole
    # QAT epoch costs two float epochs; 2 x 100 batches matched a whole epoch (docs/experiments.md).
    g.add_argument("--qat-epochs", type=int, default=2, help="QAT fine-tuning epochs")
    g.add_argument("--qat-batches", type=int, default=100,
                   help="training batches per QAT epoch, each epoch a fresh random part of the data (0: all)")
    g.add_argument("--qat-lr", type=float, default=None, help="default: the peak --lr / 100, cosine-decayed")
    g.add_argument("--qat-freeze-observer-after", type=int, default=1,
                   help="QAT epochs after which the quantization ranges stop updating")
    g.add_argument("--qat-freeze-bn-after", type=int, default=1,
                   help="QAT epochs after which batch-norm statistics are frozen")
    g.add_argument("--weight-bits", type=int, default=8, choices=[8, 6, 4],
                   help="QAT and PTQ weights on a 2^bits-level per-channel grid, stored and run as int8; "
                        "activations stay 8-bit")
    g.add_argument("--reduce-range", choices=["auto", "on", "off"], default="auto",
                   help="7-bit activations (QAT and PTQ). auto: on for the eager flow (with all 8 bits fbgemm's int16 "
                        "sums saturate on some inputs, even with VNNI); for PT2E only on CPUs without VNNI "
                        "(torchao's should_reduce_range). 8 bits let OpenVINO int8 agree with PyTorch int8")
    g.add_argument("--ptq-batches", type=int, default=32, help="training batches used to calibrate PTQ")
    g.add_argument("--no-ptq", action="store_true", help="skip the post-training quantization baseline")
    g = p.add_argument_group("deploy: every form verified and timed")
    g.add_argument("--deploy-runtimes", nargs="+", choices=deploy.RUNTIMES, default=list(deploy.RUNTIMES),
                   help="runtimes to verify and time (one that is not installed is a note)")
    g.add_argument("--bench-batch-sizes", type=int, nargs="+", default=[1, 64], help="latency batch sizes")
    g.add_argument("--bench-runs", type=int, default=50, help="timed runs per measurement (after warm-up)")
    g.add_argument("--bench-warmup", type=int, default=10)
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.time_budget is not None:
        if args.epochs is not None or args.float_checkpoint:
            parser.error("--time-budget chooses the number of float epochs: give either it or "
                         + ("--epochs" if args.epochs is not None else "--float-checkpoint"))
        if args.time_budget <= 0:
            parser.error(f"--time-budget is out of range: {args.time_budget}")
        args.epochs = 0  # chosen by plan_epochs once the pace is measured
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.qat_lr is None:
        args.qat_lr = args.lr / 100
    args.pt2e_reduce_range = args.reduce_range == "on" or (args.reduce_range == "auto" and pt2e.needs_reduce_range())
    args.reduce_range = args.reduce_range != "off"  # the eager flow's
    if args.flow != "eager" and args.weight_bits != 8:
        parser.error(f"--weight-bits {args.weight_bits} is for --flow eager; PT2E's X86InductorQuantizer has 8 only")
    if args.flow != "eager" and WORLD_SIZE > 1:
        parser.error("under torchrun use --flow eager: the PT2E flow trains in one process")
    checks = [("--epochs", args.epochs >= 1 or args.time_budget is not None), ("--qat-epochs", args.qat_epochs >= 0),
              ("--qat-batches", args.qat_batches >= 0),
              ("--batch-size", args.batch_size >= 2), ("--lr", args.lr > 0), ("--qat-lr", args.qat_lr > 0),
              ("--weight-decay", args.weight_decay >= 0), ("--momentum", 0 <= args.momentum < 1),
              ("--warmup-pct", 0 < args.warmup_pct < 1), ("--label-smoothing", 0 <= args.label_smoothing < 1),
              ("--crop-padding", 0 <= args.crop_padding <= 16), ("--cutout", 0 <= args.cutout <= 32),
              ("--threads", args.threads >= 1), ("--train-subset", args.train_subset >= 0),
              ("--test-subset", args.test_subset >= 0), ("--ptq-batches", args.ptq_batches >= 1),
              ("--bench-runs", args.bench_runs >= 1), ("--bench-warmup", args.bench_warmup >= 0),
              ("--bench-batch-sizes", all(b >= 1 for b in args.bench_batch_sizes)),
              ("--qat-freeze-observer-after", args.qat_freeze_observer_after >= 0),
              ("--qat-freeze-bn-after", args.qat_freeze_bn_after >= 0)]
    for flag, ok in checks:
        if not ok:
            why = " (batch norm trains on 2 images a batch at the least)" if flag == "--batch-size" else ""
            parser.error(f"{flag} is out of range: {getattr(args, flag[2:].replace('-', '_'))}{why}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available here; use --device cpu or auto")
    if args.float_checkpoint and not Path(args.float_checkpoint).is_file():
        parser.error(f"--float-checkpoint '{args.float_checkpoint}' does not exist")
    args.world_size = WORLD_SIZE
    return args


def check_out_dir(args):
    """OUT_DIR/<model>, checked before any long work; cli makes it when the run takes its lock."""
    out = Path(args.out_dir) / args.model
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise utils.UserError(f"--out-dir: '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise utils.UserError(f"--out-dir: '{existing}' is not writable; choose another --out-dir")
    return out


def load_data(args):
    # Under torchrun, local rank 0 decodes (or downloads) first; the other processes of its machine then read the
    # decode cache. Every process gets one barrier.
    if dist.is_initialized() and LOCAL_RANK > 0:
        dist.barrier()
    data = load_cifar10(args.data_dir, args.cache_dir)
    if dist.is_initialized() and LOCAL_RANK == 0:
        dist.barrier()
    for split, n in (("train", args.train_subset), ("test", args.test_subset)):
        if n:
            images, labels = data[split]
            idx = balanced_subset(labels, n, args.seed)
            data[split] = images[idx], labels[idx]
    n, least = len(data["train"][1]), 2 * WORLD_SIZE  # batch norm trains on 2 images a process at the least
    if n < least:
        raise utils.UserError(f"{n} training image{'s' * (n != 1)} cannot train: batch norm needs at least {least}"
                              f"{' (2 per process)' * (WORLD_SIZE > 1)}; use --train-subset {least} or more")
    print(f"data: {args.data_dir} ({find_layout(args.data_dir)} layout), "
          f"{n} train / {len(data['test'][1])} test images")
    dropped = Batches(*data["train"], args.batch_size, args.seed, "cpu").dropped
    if dropped:
        print(f"note: {n} training images in batches of {args.batch_size * WORLD_SIZE} leave a last batch of "
              f"{dropped}, too few for batch norm: it is left out of every epoch")
    return data


def train_float(args, data, device, out, ckpt=None, clock=None):
    """Float training with SGD + nesterov and OneCycleLR (annealed warm-up to the peak LR, then cosine decay).

    ckpt: a checkpoint to continue from; one of the QAT stage means float training is done (fp32.pt).
    """
    torch.manual_seed(args.seed)
    model = models.create_model(args.model)
    if args.float_checkpoint:
        model.load_state_dict(training.load_state_dict(args.float_checkpoint, model))
        return model, []
    if ckpt and ckpt["stage"] != "fp32":
        model.load_state_dict(training.load_state_dict(out / "fp32.pt", model))
        return model, [h for h in ckpt["history"] if h["stage"] == "fp32"]
    # --sync-bn converts the BN layers of a copy, which trains; model keeps plain BN for fusion, PTQ and export
    sync = args.sync_bn and dist.is_initialized()
    trained = training.convert_sync_batchnorm(copy.deepcopy(model), device) if sync else model
    trained.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(trained.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True,
                                weight_decay=args.weight_decay)
    batches = Batches(*data["train"], args.batch_size, args.seed, device, padding=args.crop_padding,
                      cutout=args.cutout)
    steps = args.epochs * len(batches)
    peak = schedule.short_run_peak(args.lr, steps)
    if peak < args.lr:
        print(f"note: a short run ({steps} steps < {schedule.SHORT_RUN_STEPS}): peak LR {peak:.3g} instead of "
              f"{args.lr:g}")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, peak, pct_start=args.warmup_pct, total_steps=steps)
    with training.dead_taps_cut(trained, torch.zeros(1, 3, 32, 32, device=device)):
        history = training.fit(trained, optimizer, scheduler, batches, data, args, device, "fp32", args.epochs, out,
                               ckpt, clock=clock)
    model.load_state_dict(trained.state_dict())  # SyncBatchNorm has BatchNorm2d's parameters and buffers
    return model.cpu().to(memory_format=torch.contiguous_format), history


SQNR_IMAGES = 256  # the first test images: the fixed batch of the per-layer quantization error


def main(args, out):
    """The pipeline, stage by stage; the stage names are the keys of report.json's "seconds".

    Under torchrun every process trains (float, QAT); rank 0 alone writes files and runs the later stages."""
    started = time.time()
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = models.ENGINE
    device, distributed = training.setup_distributed(args)
    main_process = utils.get_rank() == 0
    ckpt = training.load_checkpoint(args, out)
    stages = utils.Stages()
    report = dict(model=args.model, epochs=0 if args.float_checkpoint else args.epochs, qat_epochs=args.qat_epochs,
                  weight_bits=args.weight_bits, flow=args.flow, layer_sqnr_images=SQNR_IMAGES,
                  device=str(device), args=vars(args), environment=environment(args.threads),
                  distributed=distributed, accuracy={}, agreement={}, train_images_per_s={}, data_share={},
                  model_size_bytes={}, seconds=stages.seconds, history=[], artifacts={})

    def record_training(stage, history):
        report["history"] += history
        if history:
            report["train_images_per_s"][stage] = sum(r["images_per_s"] for r in history) / len(history)
            report["data_share"][stage] = sum(r["data_share"] for r in history) / len(history)

    with stages("data"):  # 1. data
        data = load_data(args)
        test_images, test_labels = data["test"]
        sqnr_images = normalize(test_images[:SQNR_IMAGES])
    flows = ("eager", "pt2e") if args.flow == "both" else (args.flow,)
    if not args.reduce_range:
        print("note: --reduce-range off: int8 activations use all 8 bits; PyTorch's fbgemm kernels may saturate on "
              "some inputs and CPUs without VNNI overflow (README: How the deploy benchmark is made)")
    print(f"note: eager-mode quantization and TorchScript are deprecated in torch {torch.__version__.split('+')[0]}; "
          "this pipeline pins that release and hides their deprecation warnings (README: Deprecations and pinning)")
    if "pt2e" in flows:
        print(f"note: the PT2E flow runs on torchao {pt2e.TORCHAO}, torch.export, AOTInductor (compiled with the C++ "
              f"compiler) and the dynamo ONNX exporter (onnxscript {pt2e.ONNXSCRIPT}), none of them deprecated")

    with stages("fp32_train"):  # 2. float training
        clock = schedule.RunClock(args, len(data["train"][1]), len(test_labels), started)
        if args.time_budget is not None and not args.epochs:
            report["time_budget"] = schedule.plan_epochs(args, data, device, clock)
            report["epochs"] = args.epochs = report["time_budget"]["chosen_epochs"]
        fp32_model, fp32_history = train_float(args, data, device, out, ckpt, clock)
        if main_process:
            training.check_finite(fp32_model, "the float model", training.divergence_hint(args, "fp32"))
            fp32_preds = training.predict(fp32_model, test_images)
            # the models stage 6 exports and the predictions each deploy form must reproduce, filled per flow
            onnx_models, references = {"fp32": (fp32_model, fp32_preds)}, {"fp32": fp32_preds}
            utils.torch_save(fp32_model.state_dict(), out / "fp32.pt")
            record_training("fp32", fp32_history)
            report["accuracy"]["fp32"] = training.top1(fp32_preds, test_labels)
            report["artifacts"]["fp32_state_dict"] = "fp32.pt"
            save_report(report, out)

    if "eager" in flows:
        with stages("qat_train"):  # 3. QAT fine-tuning
            qat_model, history = eager.train_qat(fp32_model, fp32_history, data, args, device, out, ckpt, clock)
            if dist.is_initialized():  # training is over: the other processes end here; rank 0 takes their cores
                dist.barrier()
                dist.destroy_process_group()
                args.threads = min(os.cpu_count(), args.threads * LOCAL_WORLD_SIZE)
                torch.set_num_threads(args.threads)
                report["environment"]["threads"] = args.threads
            if not main_process:
                return None
            utils.torch_save(qat_model.state_dict(), out / "qat.pt")  # a later PT2E QAT's checkpoint resumes from it
            record_training("qat", history)
            # the last QAT epoch has just evaluated this same model on the test set (~40 s for MobileNetV2 on 2 cores)
            report["accuracy"]["qat_fake_quant"] = history[-1]["test_acc"] if history else training.accuracy(
                qat_model, data["test"])

        with stages("convert"):  # 4. int8 conversion, TorchScript
            int8_model, int8_ts = eager.quantize_int8(qat_model, args)
            int8_preds = references["int8"] = training.predict(int8_model, test_images)
            onnx_models["int8"] = int8_model, int8_preds
            utils.torch_save(int8_ts, out / "int8.pt")
            report["accuracy"]["int8"] = training.top1(int8_preds, test_labels)
            report["artifacts"].update(int8_torchscript="int8.pt", qat_state_dict="qat.pt")
            layers, qat_float = models.quantized_layers(int8_model), models.qat_float_counterpart(qat_model)
            report["layer_sqnr"] = {"qat": models.layer_sqnr(qat_float, int8_model, sqnr_images, layers)}
            # how far fine-tuning moved the float network: not quantization error, so reported apart from it
            report["qat_drift_sqnr"] = models.layer_sqnr(models.folded(fp32_model), qat_float, sqnr_images, layers)
        save_report(report, out)

        if not args.no_ptq:
            with stages("ptq"):  # 5. PTQ baseline from the same float weights
                ptq_model = eager.calibrate_ptq(fp32_model, data, args)
                report["accuracy"]["ptq_int8"] = training.accuracy(ptq_model, data["test"])
                report["layer_sqnr"] = {"ptq": models.layer_sqnr(models.folded(fp32_model), ptq_model, sqnr_images,
                                                                 layers), **report["layer_sqnr"]}
                report["qat_vs_ptq"] = 100 * (report["accuracy"]["int8"] - report["accuracy"]["ptq_int8"])

    if "pt2e" in flows:
        with stages("pt2e"):  # 3-5 in the PT2E flow, and its files
            entries, references["int8_pt2e"] = pt2e.run(fp32_model, report["history"], data, sqnr_images, args,
                                                        device, out, ckpt, clock)
            report["history"] += entries.pop("history")
            for key, value in entries.items():
                report[key] = {**report.get(key, {}), **value}
            if "int8" in report["accuracy"]:
                report["pt2e_vs_eager"] = 100 * (report["accuracy"]["pt2e_int8"] - report["accuracy"]["int8"])
        save_report(report, out)

    with stages("onnx"):  # 6. ONNX export, check, simplification, ONNX Runtime verification
        onnx_report, onnx_paths = export.export_and_verify(onnx_models, data, out, args.threads, args.weight_bits)
        report["onnx"] = onnx_report["onnx"]
        report["accuracy"].update(onnx_report["accuracy"])
        report["agreement"].update(onnx_report["agreement"])
        report["artifacts"].update({f"{name}_onnx": path.name for name, path in onnx_paths.items()})

    with stages("deploy"):  # 7. every form in every runtime: verified, timed, the fastest recommended
        report.update(deploy.run(fp32_model, references, data, out, args))
        print(deploy_table(report))

    with stages("report"):  # 8. report.json, report.md, plots
        files = dict(fp32="fp32.pt", int8="int8.pt", pt2e_int8="int8_pt2e.pt2", fp32_aoti="fp32.pt2",
                     pt2e_int8_onnx="int8_pt2e.onnx", **{f"{n}_onnx": p.name for n, p in onnx_paths.items()})
        for key, name in files.items():
            if name in report["artifacts"].values():
                report["model_size_bytes"][key] = (out / name).stat().st_size
        if "time_budget" in report:
            report["time_budget"]["actual_s"] = time.time() - clock.start
        save_report(report, out, plots=True)
    print(summary(report))
    print(f"outputs in {out}/: {', '.join(sorted(report['artifacts'].values()))}, report.json, report.md")
    print("\n".join(recommendation_lines(report)))
    return report


def resume_command(argv):
    launcher = "python"
    if TORCHRUN:
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
        launcher = f"torchrun --nproc-per-node {LOCAL_WORLD_SIZE}" if nodes == 1 else "torchrun (the same options)"
    return f"{launcher} cifar.py {' '.join(a for a in argv if a != '--resume')} --resume".replace("  ", " ")


def cli(argv=None):
    """The command line: main() with every failure as one line on stderr and an exit code (README: exit codes).

    Under torchrun the processes of one machine see the same input and print the same lines: local rank 0 speaks
    for them; another process prints only an error of its own, prefixed with its rank.
    """
    argv = sys.argv[1:] if argv is None else argv
    if LOCAL_RANK > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, utils.Terminated.handler)
    try:
        out = check_out_dir(args)
        # one run per output folder: a second one would mix its checkpoints and files into this one's; under
        # torchrun rank 0 holds it for the job (the other processes write nothing)
        with utils.exclusive_folder(out) if RANK == 0 else contextlib.nullcontext():
            main(args, out)
    except (utils.UserError, utils.RunError, KeyboardInterrupt) as e:
        # torchrun sends SIGTERM to the others when a process ends: let nothing interrupt this message
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if args.debug and not isinstance(e, KeyboardInterrupt):
            raise
        kept = f"finished epochs are kept in {Path(args.out_dir) / args.model}/checkpoint.pt; continue with: " \
               f"{resume_command(argv)}"
        if isinstance(e, KeyboardInterrupt):
            what, code = ("terminated", 143) if isinstance(e, utils.Terminated) else ("interrupted", 130)
            message = f"{what}: {kept}"
        else:
            code = e.exit_code
            message = f"error: {e}" + (f"; {kept}" if isinstance(e, utils.PeerFailed) else "")
        if LOCAL_RANK == 0:
            print(message, file=sys.stderr)
        elif isinstance(e, utils.RunError) and not isinstance(e, utils.PeerFailed):
            print(f"rank {os.environ.get('RANK')}: {message}", file=sys.__stderr__)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(cli())
