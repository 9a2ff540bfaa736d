"""Models and the eager-mode quantization steps: fusion, fake-quant config, conversion, warnings."""
import copy
import warnings

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
from torch import nn
from torchvision.models.resnet import BasicBlock

import data
import models

ARCHS = list(models.ARCHS)


@pytest.mark.parametrize("name", ARCHS)
def test_create_model_gives_10_logits_and_state_dict_loads_into_the_qat_model(name):
    torch.manual_seed(0)
    model = models.create_model(name).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    qat = models.create_model(name)
    qat.load_state_dict(model.state_dict(), strict=True)  # no remapping between float and quantizable
    models.prepare_quantization(qat, qat=True)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first_fused = next(m for m in qat.modules() if isinstance(m, nniqat.ConvBnReLU2d))
    assert torch.equal(first_fused.weight, first_conv.weight)  # the float weights went in unchanged


def test_mobilenet_v2_last_blocks_see_a_4x4_map_of_a_32x32_image():
    model = models.create_model("mobilenet_v2").eval()
    sizes = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, inputs, out: sizes.append(tuple(out.shape[-2:])))
    model(torch.randn(1, 3, 32, 32))
    assert sizes[-1] == (4, 4) and min(sizes) == (4, 4)  # ImageNet strides would end at 1x1


@pytest.mark.parametrize("name", ARCHS)
def test_residual_blocks_start_as_the_identity_in_mobilenet_v2_only(name):
    torch.manual_seed(0)
    model = models.create_model(name).eval()
    blocks = [m for m in model.modules()
              if getattr(m, "use_res_connect", False) or (isinstance(m, BasicBlock) and m.downsample is None)]
    assert len(blocks) == {"mobilenet_v2": 10, "resnet18": 5}[name]
    identity = []
    for block in blocks:
        channels = block.conv[0][0].in_channels if name == "mobilenet_v2" else block.conv1.in_channels
        x = torch.randn(2, channels, 4, 4)
        with torch.no_grad():  # a zeroed residual branch adds exactly zero (ResNet's block ends in a ReLU)
            identity.append(torch.equal(block(x), x if name == "mobilenet_v2" else torch.relu(x)))
    # MobileNetV2: all of them (models.RESIDUAL_LAST_BN); ResNet18 keeps torchvision's init: none
    assert sum(identity) == {"mobilenet_v2": 10, "resnet18": 0}[name]


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="mobilenet_v2, resnet18"):
        models.create_model("vgg")


@pytest.mark.parametrize("name", ARCHS)
def test_fusion_preserves_float_outputs(name):
    torch.manual_seed(0)
    model = models.create_model(name)
    model.train()  # give BN non-trivial running statistics first
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    model.eval()
    fused = copy.deepcopy(model)
    fused.fuse_model(is_qat=False)
    assert any(isinstance(m, nni.ConvReLU2d) for m in fused.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = data.normalize(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


def test_fusion_preserves_float_outputs_on_real_images(real_images):
    torch.manual_seed(0)
    model = models.create_model("resnet18").eval()
    fused = copy.deepcopy(model)
    fused.fuse_model(is_qat=False)
    x = data.normalize(real_images[0][:32])
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ARCHS)
def test_prepare_qat_puts_fake_quant_on_every_conv_and_linear(name):
    model = models.prepare_quantization(models.create_model(name), qat=True)
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) > 10
    for m in weighted:
        wfq = m.weight_fake_quant
        assert wfq.dtype == torch.qint8 and wfq.qscheme == torch.per_channel_symmetric
        assert m.activation_post_process.dtype == torch.quint8
    assert model.quant.activation_post_process.dtype == torch.quint8
    convs = [m for m in weighted if isinstance(m, nn.Conv2d)]
    assert all(isinstance(m, (nniqat.ConvBn2d, nniqat.ConvBnReLU2d)) for m in convs)  # every BN fused


@pytest.mark.parametrize("name", ARCHS)
def test_convert_gives_int8_conv_and_linear(name):
    model = models.prepare_quantization(models.create_model(name), qat=True)
    model(torch.randn(8, 3, 32, 32))
    int8 = models.convert_int8(model)
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in int8.modules())
    convs = [m for m in int8.modules() if isinstance(m, (nnq.Conv2d, nniq.ConvReLU2d))]
    linears = [m for m in int8.modules() if isinstance(m, nnq.Linear)]
    assert len(convs) > 10 and len(linears) == 1
    for m in convs + linears:
        assert m.weight().dtype == torch.qint8
    assert int8(torch.randn(2, 3, 32, 32)).dtype == torch.float32  # DeQuantStub at the end
    assert any(isinstance(m, nniqat.ConvBnReLU2d) for m in model.modules())  # the QAT model is untouched


@pytest.mark.parametrize("name", ARCHS)
def test_int8_biases_sit_on_the_int32_grid_and_the_export_copy_truncates_to_it(name):
    model = models.create_model(name)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # fresh BN folds to zero biases
        nn.init.uniform_(bn.bias, -1, 1)
        nn.init.uniform_(bn.weight, 0.5, 1.5)  # as after training: QAT's ConvBn divides by BN weights
    model = models.prepare_quantization(model, qat=True)
    model(torch.randn(8, 3, 32, 32))
    int8 = models.convert_int8(model)
    modules, exported = dict(int8.named_modules()), dict(models.onnx_exportable(int8).named_modules())
    input_scale = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, n=n: input_scale.__setitem__(n, args[0].q_scale()))
             for n, m in modules.items() if isinstance(m, (nnq.Conv2d, nnq.Linear))]
    int8(torch.randn(1, 3, 32, 32))
    [h.remove() for h in hooks]
    assert len(input_scale) > 10
    for n, scale in input_scale.items():
        step = scale * modules[n].weight().q_per_channel_scales()
        q, moved = modules[n].bias().double() / step, exported[n].bias().double() / step
        assert torch.allclose(q, q.round(), atol=0.05)  # integers (to float32 precision), as ONNX's int32 bias
        assert torch.equal(moved.trunc(), q.round())  # the exporter truncates: it lands on the same integers
        # the export copy sits a quarter step off the grid (on it for a zero bias)
        assert torch.allclose((moved - q).abs(), 0.25 * (q.round() != 0).double(), atol=0.05)
    assert all((modules[n].bias() != 0).any() for n in input_scale if isinstance(modules[n], nnq.Conv2d))


def test_ptq_uses_eval_fusion_with_the_same_qconfig_family():
    model = models.prepare_quantization(models.create_model("mobilenet_v2").eval(), qat=False)
    assert not model.training
    assert any(isinstance(m, nni.ConvReLU2d) for m in model.modules())
    assert model.features[0][0].qconfig.weight().qscheme == torch.per_channel_symmetric


def test_only_the_ao_quantization_deprecation_is_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        import importlib
        importlib.reload(models)  # re-applies the project's filter on top of "default"
        models.prepare_quantization(models.create_model("resnet18"), qat=True)
        warnings.warn("another deprecation", DeprecationWarning)
    messages = [str(w.message) for w in caught]
    assert not any("torch.ao.quantization is deprecated" in m for m in messages)
    assert "another deprecation" in messages


@pytest.mark.parametrize("qat", [False, True])
def test_convert_warns_of_no_observer_that_never_ran(qat):
    # MobileNetV2's blocks without a residual hold a skip_add they never call: it must get no observer
    model = models.prepare_quantization(models.create_model("mobilenet_v2"), qat=qat)
    model(torch.randn(4, 3, 32, 32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models.convert_int8(model)
    assert not [w for w in caught if "must run observer" in str(w.message)]
    assert isinstance(model.features[1].skip_add.activation_post_process, nn.Identity)
    assert not isinstance(model.features[3].skip_add.activation_post_process, nn.Identity)  # a residual block's


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("qat", [False, True])
def test_converted_weights_lie_on_the_weight_bits_grid(bits, qat):
    model = models.prepare_quantization(models.create_model("resnet18"), qat=qat, weight_bits=bits)
    model(torch.randn(8, 3, 32, 32))
    int8 = models.convert_int8(model)
    weights = [m.weight() for m in int8.modules() if isinstance(m, (nnq.Conv2d, nnq.Linear))]
    assert len(weights) > 10
    lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    for w in weights:
        q = w.int_repr()
        assert w.dtype == torch.qint8 and q.min() >= lo and q.max() <= hi
    if not qat:  # the grid is used, not just respected: the largest weight of each layer sits on its edge
        # (QAT's BN folding at convert uses running statistics updated after the fake quantization saw the weights)
        assert all(max(-w.int_repr().min().item(), w.int_repr().max().item()) >= hi for w in weights)
    assert int8(torch.randn(2, 3, 32, 32)).isfinite().all()


def test_layer_sqnr_is_high_with_the_calibrated_scale_and_low_with_a_coarse_one():
    torch.manual_seed(0)
    fp32 = models.create_model("resnet18").eval()
    for bn in (m for m in fp32.modules() if isinstance(m, nn.BatchNorm2d)):  # zero-initialised BN weights: no signal
        nn.init.uniform_(bn.weight, 0.5, 1.5)
    images = torch.randn(16, 3, 32, 32)
    ptq = models.prepare_quantization(copy.deepcopy(fp32), qat=False)
    ptq(images)  # calibrated on the batch it is measured on: every scale fits
    int8 = models.convert_int8(ptq)
    sqnr = lambda: {e["layer"]: e["sqnr_db"] for e in models.layer_sqnr(models.folded(fp32), int8, images,
                                                                         models.quantized_layers(int8))}
    good = sqnr()
    assert len(good) == 21 and min(good.values()) > 15, good
    int8.layer2[0].conv1.scale *= 50  # an output grid 50x too coarse: most outputs round to a few levels
    bad = sqnr()
    assert bad["layer2.0.conv1"] < 10 and bad["layer2.0.conv1"] < good["layer2.0.conv1"] - 15, (good, bad)
    assert all(abs(bad[n] - good[n]) < 1e-4 for n in list(good)[:list(good).index("layer2.0.conv1")])  # upstream


@pytest.mark.parametrize("qat", [True, False])
def test_reduce_range_off_gives_activations_twice_the_levels(qat):
    """fbgemm's 7-bit activations (reduce_range, for CPUs without VNNI) against all 8 bits: half the step."""
    scales = {}
    for reduce_range in (True, False):
        fake_quant = models.qconfig(qat, reduce_range=reduce_range).activation()
        fake_quant(torch.linspace(0, 10, 100))
        observer = fake_quant.activation_post_process if qat else fake_quant
        assert (observer.quant_min, observer.quant_max) == (0, 127 if reduce_range else 255)
        scales[reduce_range] = observer.calculate_qparams()[0].item()
    assert scales[False] == pytest.approx(scales[True] / 2, rel=0.01)


def test_qat_sqnr_compares_with_the_qat_models_own_float_network():
    """QAT's reference holds the QAT model's weights: fine-tuning drift from the pre-QAT model is not counted as
    quantization error, and a coarse output grid still shows."""
    torch.manual_seed(0)
    fp32 = models.create_model("resnet18").eval()
    for bn in (m for m in fp32.modules() if isinstance(m, nn.BatchNorm2d)):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
    images = torch.randn(16, 3, 32, 32)
    qat = models.prepare_quantization(copy.deepcopy(fp32).train(), qat=True)
    qat(images)  # the ranges see the batch the error is measured on
    with torch.no_grad():  # fine-tuning moved one layer's weights far from the float model's
        qat.layer1[0].conv1.weight.mul_(-1)
    qat.apply(torch.ao.quantization.disable_observer)
    qat(images)
    qat.eval()
    int8 = models.convert_int8(qat)
    layers = models.quantized_layers(int8)
    sqnr = lambda ref: {e["layer"]: e["sqnr_db"] for e in models.layer_sqnr(ref, int8, images, layers)}
    own, pre_qat = sqnr(models.qat_float_counterpart(qat)), sqnr(models.folded(fp32))
    assert own["layer1.0.conv1"] > 15 and pre_qat["layer1.0.conv1"] < 0, (own, pre_qat)
    int8.layer1[0].conv1.scale *= 50
    assert sqnr(models.qat_float_counterpart(qat))["layer1.0.conv1"] < own["layer1.0.conv1"] - 15
