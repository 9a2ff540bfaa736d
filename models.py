"""The quantizable torchvision models and the eager-mode quantization steps (fusion, qconfig, convert)."""
import copy
import functools
import warnings

import torch
import torch.nn as nn
import torch.ao.nn.quantized as nnq
from torch.ao import quantization as tq
from torch.ao.ns.fx.utils import compute_sqnr
from torchvision.models import quantization as qmodels

# Eager-mode quantization and TorchScript are deprecated in torch 2.14 but are what deploys today (README:
# Deprecations and pinning): silence exactly their messages (cifar.py says so at start-up); every other warning stays.
DEPRECATIONS = [
    "torch.ao.quantization is deprecated",
    r"`torch\.jit\.(trace|trace_method|freeze|optimize_for_inference|save|load)` is deprecated",
    "torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation functions",
    "Please use quant_min and quant_max to specify the range for observers",  # reduce_range, fbgemm's qconfig
]
for message in DEPRECATIONS:
    warnings.filterwarnings("ignore", message=message)

ENGINE = "fbgemm"
# MobileNetV2 at width 0.75 trains 1.4x as many images per second as at width 1.0: on 2 cores, more epochs beat wider
# layers in the same time (docs/experiments.md).
ARCHS = {"mobilenet_v2": functools.partial(qmodels.mobilenet_v2, width_mult=0.75), "resnet18": qmodels.resnet18}
# torchvision's ImageNet strides shrink a 32x32 image to 1x1 before MobileNetV2's last seven blocks, whose 3x3
# depthwise convs then see only their centre tap: stride 1 in these two keeps a 4x4 map there. ResNet18 keeps its
# strides: stride 1 in layer4 slowed training by a third for no accuracy at equal time (docs/experiments.md).
CIFAR_STRIDE_ONE = {
    "mobilenet_v2": lambda m: [m.features[7].conv[1][0], m.features[14].conv[1][0]],  # depthwise convs
    "resnet18": lambda m: [],
}


# MobileNetV2's residual blocks start as the identity (last BN weight zero, the idea of torchvision's
# zero_init_residual), so the signal crosses the whole depth from the first step. ResNet18 keeps torchvision's
# initialisation, which did better in its full run (docs/experiments.md).
RESIDUAL_LAST_BN = {
    "mobilenet_v2": lambda m: [b.conv[-1] for b in m.features if getattr(b, "use_res_connect", False)],
    "resnet18": lambda m: [],
}


def create_model(name, num_classes=10):
    """The quantizable class (QuantStub/DeQuantStub, fuse_model): random weights, CIFAR strides and init.

    The float model is this same class, so its state_dict loads into the QAT model without remapping.
    """
    if name not in ARCHS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(ARCHS)}")
    model = ARCHS[name](weights=None, quantize=False, num_classes=num_classes)
    for conv in CIFAR_STRIDE_ONE[name](model):
        conv.stride = (1, 1)
    for bn in RESIDUAL_LAST_BN[name](model):
        nn.init.zeros_(bn.weight)
    return model


def qconfig(qat, weight_bits=8, reduce_range=True):
    """fbgemm's qconfig; weight_bits < 8 narrows its per-channel symmetric weight grid to 2^weight_bits levels
    (the weights stay int8 tensors, so the int8 kernels run them); reduce_range=False gives activations all 256
    levels instead of fbgemm's 128."""
    # version=0: plain FakeQuantize. The fused default (version=1) trains against per-channel weight qparams of its
    # own kernel while convert() re-derives symmetric ones from the observer, so the int8 model drifted from the
    # QAT model (75-88% prediction agreement against 98-99%; docs/experiments.md).
    base = tq.get_default_qat_qconfig(ENGINE, version=0) if qat else tq.get_default_qconfig(ENGINE)
    if weight_bits == 8 and reduce_range:
        return base
    activation = base.activation
    if not reduce_range:
        # fbgemm's 7-bit activations keep u8 x s8 pair sums inside int16; all 8 bits halve the rounding step, with
        # which OpenVINO (rounding ties away from zero) agrees with PyTorch, but fbgemm's sums then saturate on
        # some inputs (docs/experiments.md)
        activation = (tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                                reduce_range=False) if qat
                      else tq.HistogramObserver.with_args(reduce_range=False))
    weight = base.weight
    if weight_bits < 8:
        grid = dict(quant_min=-2 ** (weight_bits - 1), quant_max=2 ** (weight_bits - 1) - 1, dtype=torch.qint8,
                    qscheme=torch.per_channel_symmetric)
        weight = (tq.FakeQuantize.with_args(observer=tq.MovingAveragePerChannelMinMaxObserver, **grid) if qat
                  else tq.PerChannelMinMaxObserver.with_args(**grid))
    return tq.QConfig(activation=activation, weight=weight)


def fuse(model, qat):
    """torchvision's fuse_model in place: conv+bn(+relu) kept trainable (QAT, train mode) or BN folded (eval)."""
    model.train(qat)
    model.fuse_model(is_qat=qat)
    return model


def prepare_quantization(model, qat, weight_bits=8, reduce_range=True):
    """Fuse conv/bn/relu, attach the fbgemm qconfig and insert observers (PTQ) or fake-quant (QAT), in place.

    QAT keeps BN as a trainable part of the fused ConvBn(ReLU) modules (train mode); PTQ folds BN (eval mode).
    """
    torch.backends.quantized.engine = ENGINE
    fuse(model, qat)
    model.qconfig = qconfig(qat, weight_bits, reduce_range)
    for m in model.modules():  # MobileNetV2's blocks without a residual never call skip_add: no observer for it
        if getattr(m, "use_res_connect", True) is False:
            m.skip_add.qconfig = None
    return (tq.prepare_qat if qat else tq.prepare)(model, inplace=True)


def convert_int8(model):
    """A converted int8 copy (CPU, eval) with int32-grid biases; model itself is left as it is."""
    torch.backends.quantized.engine = ENGINE
    return int32_bias(tq.convert(copy.deepcopy(model).cpu().eval(), inplace=True))


def int32_bias(int8_model, away_from_zero=0.0):
    """Round every quantized conv/linear bias to the int32 grid (input scale x weight scale), in place.

    fbgemm adds the float bias, while ONNX (QLinearConv) holds it as int32: the half-step difference, compounded
    through MobileNetV2's 52 layers, made ONNX Runtime predict another class than PyTorch int8 for 2.7% of the
    test images; on the grid both compute the same integers. away_from_zero=0.25 moves each value a quarter
    step off the grid for torch.onnx's TorchScript exporter, which truncates bias / scale to int32 instead of
    rounding it.
    """
    input_scale = {}

    def record(module, args):
        input_scale[module] = args[0].q_scale()

    hooks = [m.register_forward_pre_hook(record) for m in int8_model.modules()
             if isinstance(m, (nnq.Conv2d, nnq.Linear)) and m.bias() is not None]
    if hooks:
        with torch.no_grad():
            int8_model(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    for m, scale in input_scale.items():
        w = m.weight()
        per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        step = scale * (w.q_per_channel_scales() if per_channel else torch.tensor(w.q_scale(), dtype=torch.double))
        k = torch.round(m.bias().double() / step)
        m.set_weight_bias(w, ((k + away_from_zero * torch.sign(k)) * step).float())
    return int8_model


def onnx_exportable(model):
    """The copy of model to give torch.onnx.export (see int32_bias); float models come back unchanged."""
    return int32_bias(copy.deepcopy(model), away_from_zero=0.25)


def to_torchscript(model):
    """Traced and frozen TorchScript: loads with plain torch.jit.load, no project code needed."""
    with torch.no_grad():
        return torch.jit.freeze(torch.jit.trace(model.eval(), torch.randn(1, 3, 32, 32)))


QUANTIZED_LAYERS = (nnq.Conv2d, nnq.Linear)  # the ReLU-fused quantized kinds subclass these


def folded(fp32_model):
    """A BN-folded eval copy of the float model, with the module names of the converted int8 model."""
    return fuse(copy.deepcopy(fp32_model).cpu(), qat=False)


def qat_float_counterpart(qat_model):
    """The QAT model's own float network: its trained weights and BN statistics, fake quantization off (eval), with
    the module names of the int8 model converted from it."""
    model = copy.deepcopy(qat_model).cpu().eval()
    model.apply(tq.disable_fake_quant)
    model.apply(tq.disable_observer)
    return model


def layer_outputs(model, names, images):
    """{name: float output} of the named modules of model on images."""
    outputs = {}
    store = lambda m, args, out, name: outputs.__setitem__(name, out.dequantize() if out.is_quantized else out)
    hooks = [m.register_forward_hook(functools.partial(store, name=name)) for name, m in model.named_modules()
             if name in names]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return outputs


def layer_sqnr(reference, model, images, layers):
    """SQNR in dB of model's output at each of `layers` (module names, in network order) against reference's output
    at the same name, on one batch of normalized images: [{"layer", "sqnr_db"}, ...].

    Each model runs whole, so a layer's figure includes the error it inherits from the layers before it, as in
    deployment. The reference of an int8 model is its own float counterpart: for PTQ the BN-folded float model
    (folded), for QAT the QAT model without fake quantization (qat_float_counterpart); the numeric suite's
    compare_model_outputs takes a float model only."""
    ref, got = layer_outputs(reference, layers, images), layer_outputs(model, layers, images)
    return [dict(layer=name, sqnr_db=compute_sqnr(ref[name], got[name]).item()) for name in layers]


def quantized_layers(int8_model):
    """The names of int8_model's quantized conv/linear modules, in network order."""
    return [name for name, m in int8_model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]
