"""The eager-mode flow (torch.ao.quantization, the fbgemm qconfig): QAT fine-tuning of the fused quantizable model,
int8 conversion with its TorchScript form, and the post-training-quantization baseline from the same float weights:
cifar.py's stages 3-5 (--flow eager|both). pt2e.py holds the same stages in torchao's PT2E flow."""
import copy

import torch
from torch.ao import quantization as tq
from torch.ao.nn.intrinsic import qat as nniqat

import models
import training
from data import calibration_batches


def train_qat(fp32_model, fp32_history, data, args, device, out, ckpt=None, clock=None):
    """Fuse + fbgemm fake-quant, then fine-tune at a small cosine-decayed LR.

    As in torchvision's quantization reference, the ranges (observers) and BN statistics are frozen for the
    last epochs so the weights settle against fixed quantization grids.
    """
    model = models.create_model(args.model)
    model.load_state_dict(fp32_model.state_dict())
    models.prepare_quantization(model, qat=True, weight_bits=args.weight_bits, reduce_range=args.reduce_range)
    model.to(device, memory_format=torch.channels_last)
    optimizer, batches, scheduler = training.qat_recipe(model, data, args, device)

    def before_epoch(epoch):
        observe = epoch <= args.qat_freeze_observer_after
        model.apply(tq.enable_observer if observe else tq.disable_observer)
        if epoch > args.qat_freeze_bn_after:
            model.apply(nniqat.freeze_bn_stats)

    fresh = ckpt and not ckpt.get("restart_qat")
    if fresh and ckpt["stage"] == "qat_pt2e":  # --flow both: the eager QAT finished before the PT2E one began
        model.load_state_dict(training.load_state_dict(out / "qat.pt", model))
        model.apply(tq.disable_observer)
        return model.cpu(), [h for h in ckpt["history"] if h["stage"] == "qat"]
    resume = ckpt if fresh and ckpt["stage"] == "qat" else None
    with training.dead_taps_cut(model, torch.zeros(1, 3, 32, 32, device=device)):  # as train_float
        history = training.fit(model, optimizer, scheduler, batches, data, args, device, "qat", args.qat_epochs, out,
                               resume, fp32_history, before_epoch, clock, lambda: model.apply(tq.disable_observer))
    model.apply(tq.disable_observer)
    return model.cpu(), history


def calibrate_ptq(fp32_model, data, args):
    """Post-training quantization baseline: eval-mode fusion, observers fed un-augmented training batches."""
    model = copy.deepcopy(fp32_model).cpu()
    models.prepare_quantization(model, qat=False, weight_bits=args.weight_bits, reduce_range=args.reduce_range)
    with torch.no_grad():
        for x in calibration_batches(data["train"][0], args.batch_size, args.ptq_batches, args.seed):
            model(x)
    int8_model = models.convert_int8(model)
    training.check_finite(int8_model, "the PTQ int8 model", "check the float model and the data")
    return int8_model


def quantize_int8(qat_model, args):
    """Convert the QAT model to int8 on the CPU; returns the eager int8 model and its TorchScript form."""
    training.check_finite(qat_model, "the QAT model", training.divergence_hint(args, "qat"))
    int8_model = models.convert_int8(qat_model)
    return int8_model, models.to_torchscript(int8_model)
