"""Run time: the short-run LR rule, the whole-run projection behind the ETA (RunClock), and --time-budget's choice of
float epochs from a measured pace. The training itself is in training.py."""
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import models
import utils
from data import Batches
from training import LossGuard, dead_taps_cut, distribute, predict, train_one_epoch

# Runs of fewer optimizer steps scale the peak LR by steps / SHORT_RUN_STEPS: a few dozen steps warm up too fast
# to reach the full peak safely (ResNet18 diverged in 16- and 63-step runs; docs/experiments.md).
SHORT_RUN_STEPS = 200


def short_run_peak(lr, steps):
    """The one-cycle peak LR for a float run of `steps` optimizer steps."""
    return lr * min(1.0, steps / SHORT_RUN_STEPS)


class RunClock:
    """Projects the whole run's wall time from measured paces (images/s): the ETA after every epoch and
    --time-budget's choice of float epochs use this one projection."""

    QAT_PACE = 0.5  # QAT trains at 0.46-0.76x the float pace (fake quantization); until QAT has run
    # forms the deploy stage builds per runtime: torch int8 under 4 engines and 5 fp32 forms; ONNX Runtime fp32 and
    # int8; OpenVINO fp32, int8, bf16 and 2 throughput forms (a CPU without bf16 or a 4-bit run differs by one);
    # all but the throughput forms again on 1 thread where --threads is more
    FORMS, ONE_THREAD = {"torch": 9, "onnxruntime": 2, "openvino": 5}, {"torch": 9, "onnxruntime": 2, "openvino": 3}
    # --flow pt2e|both: 2 AOTInductor forms, an ONNX Runtime and an OpenVINO form (each also on 1 thread); about
    # 50 s to compile the packages (built only where torch is among the runtimes) and 10 s to export the ONNX file
    PT2E_FORMS, PT2E_PACKAGES_S, PT2E_ONNX_S = {"torch": 2, "onnxruntime": 1, "openvino": 1}, 50, 10

    def __init__(self, args, n_train, n_test, start):
        self.args, self.n_train, self.n_test = args, n_train, n_test
        self.start, self.bar = start, None  # start: time.time() when the run began
        self.flows = 2 if getattr(args, "flow", "eager") == "both" else 1  # QAT runs once per flow
        self.pt2e = getattr(args, "flow", "eager") != "eager"

    def remaining(self, pace, fp32_epochs, qat_epochs):
        """Seconds for fp32_epochs float and qat_epochs QAT epochs (all flows'), then every stage after training.

        pace: images/s of float training ("fp32"), QAT training ("qat") and float inference ("eval")."""
        a, eval_s = self.args, self.n_test / pace["eval"]
        batches = -(-self.n_train // a.batch_size)
        qat_images = min(batches, a.qat_batches or batches) * a.batch_size
        # deploy: each form predicts the test set (verification), then makes its warm-up and timed calls
        calls = (a.bench_warmup + a.bench_runs) * sum(max(b / pace["eval"], 2e-3) for b in a.bench_batch_sizes)
        forms = sum(self.FORMS[r] + self.ONE_THREAD[r] * (a.threads > 1) + self.PT2E_FORMS[r] * self.pt2e *
                    (1 + (a.threads > 1)) for r in a.deploy_runtimes)
        deploy = forms * (eval_s + calls)
        files = self.pt2e * (self.PT2E_ONNX_S + self.PT2E_PACKAGES_S * ("torch" in a.deploy_runtimes))
        # convert, PTQ, ONNX, report
        after = (3 * eval_s + a.ptq_batches * a.batch_size / pace["eval"]) * self.flows + deploy + 10 + files
        return (fp32_epochs * (self.n_train / pace["fp32"] + eval_s)
                + qat_epochs * (qat_images / pace["qat"] + 2 * eval_s) + after)

    def epoch_done(self, stage, history):
        """The ETA suffix of an epoch's line (and, after the run's first trained epoch, the ETA: line)."""
        a, row = self.args, history[-1]
        pace = dict(eval=self.n_test / max(row["eval_seconds"], 1e-6), fp32=row["images_per_s"])
        pace["qat"] = row["images_per_s"] if stage != "fp32" else self.QAT_PACE * row["images_per_s"]
        later_flows = self.flows if stage == "fp32" else self.flows - 1 if stage == "qat" else 0
        left = (a.epochs - row["epoch"] if stage == "fp32" else 0,
                (0 if stage == "fp32" else a.qat_epochs - row["epoch"]) + later_flows * a.qat_epochs)
        end = time.time() + self.remaining(pace, *left)
        if self.bar is None:
            self.bar = tqdm(total=sum(left) + 1, desc="whole run", unit="epoch", disable=None, leave=False)
            first = (f"\nETA: the whole run should take about {(end - self.start) / 60:.0f} min, ending about "
                     f"{time.strftime('%H:%M', time.localtime(end))} (refreshed after each epoch)")
        else:
            first = ""
        self.bar.update()
        return f"  ETA {time.strftime('%H:%M', time.localtime(end))}{first}"


# Timed batches per stage: against 200 batches, 20 float batches misjudged ResNet18's pace by up to 17%, 60 by up to
# 6% (MobileNetV2: 19% and 16%); QAT, a small part of a run, gained nothing from 60 (benchmarks/README.md).
PROBE_WARMUP, PROBE_BATCHES = 3, {"fp32": 60, "qat": 20}


def measure_pace(args, data, device):
    """Images/s of float and QAT training steps (after PROBE_WARMUP untimed ones) and of float inference, on
    throwaway models. Every RNG it touches is restored: --epochs N with the epochs chosen from this pace trains
    the same weights."""
    pace = {}
    with torch.random.fork_rng(devices=[]):
        for stage in ("fp32", "qat"):
            model = models.create_model(args.model)
            for m in model.modules():  # zero-initialised BN weights would make fake quantization divide by 0
                if isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
            if stage == "qat":
                models.prepare_quantization(model, qat=True, weight_bits=args.weight_bits,
                                            reduce_range=args.reduce_range)
            model.to(device, memory_format=torch.channels_last)
            optimizer, criterion = torch.optim.SGD(model.parameters(), lr=1e-4), nn.CrossEntropyLoss()
            net = distribute(model, device)  # under torchrun the pace includes DDP's communication
            with dead_taps_cut(model, torch.zeros(1, 3, 32, 32, device=device)):  # as train_float and train_qat
                for n in (PROBE_WARMUP, PROBE_BATCHES[stage]):
                    batches = Batches(*data["train"], args.batch_size, args.seed, device, max_batches=n,
                                      padding=args.crop_padding, cutout=args.cutout)
                    pace[stage] = train_one_epoch(net, batches, optimizer, None, criterion, device,
                                                  f"timing {stage}", LossGuard(factor=1e9))[2]
                if stage == "fp32":
                    images, start = data["test"][0][:1000], time.perf_counter()
                    predict(model, images, device)
                    pace["eval"] = len(images) / (time.perf_counter() - start)
    return pace


# --time-budget plans for this share of the measured pace: the probe has misjudged a run's pace by -15% to +12%
# (docs/experiments.md; a shared VM's pace drifts during a run), and a budget is a limit: rather end a little early.
PACE_MARGIN = 0.9


def choose_epochs(clock, pace, budget_s, used_s):
    """The most float epochs (at least 1) whose run, at PACE_MARGIN x the measured pace and after used_s already
    spent, ends within budget_s.

    Returns (epochs, projected seconds of the whole run at the measured pace)."""
    slower = {k: v * PACE_MARGIN for k, v in pace.items()}
    fixed = clock.remaining(slower, 0, clock.args.qat_epochs * clock.flows)
    per_epoch = clock.remaining(slower, 1, 0) - clock.remaining(slower, 0, 0)
    epochs = int((budget_s - used_s - fixed) // per_epoch)
    if epochs < 1:
        raise utils.UserError(f"--time-budget {budget_s / 60:g} is too small here: one float epoch and the rest of "
                              f"the run need about {(used_s + fixed + per_epoch) / 60:.1f} minutes")
    return epochs, used_s + clock.remaining(pace, epochs, clock.args.qat_epochs * clock.flows)


def plan_epochs(args, data, device, clock):
    """--time-budget: the float epochs from the pace measured here; the report's "time_budget" entry."""
    pace = measure_pace(args, data, device)
    choice = [choose_epochs(clock, pace, args.time_budget * 60, time.time() - clock.start), pace]
    if dist.is_initialized():  # timings differ a little between processes: all follow rank 0's choice
        dist.broadcast_object_list(choice, 0)
    (epochs, projected), pace = choice
    print(f"time budget {args.time_budget:g} min: training at {pace['fp32']:.0f} img/s (QAT {pace['qat']:.0f}), "
          f"{epochs} float epochs (planned for a {1 - PACE_MARGIN:.0%} slower pace), whole run projected at "
          f"{projected / 60:.1f} min")
    return dict(minutes=args.time_budget, images_per_s=pace["fp32"], qat_images_per_s=pace["qat"],
                chosen_epochs=epochs, projected_s=projected)
