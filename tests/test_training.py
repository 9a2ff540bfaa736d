"""Training pieces: the loss guard and the dead-tap cut (same outputs and gradients, in float and QAT models)."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.ao import quantization as tq

import cifar
import eager
import models
import training


def test_loss_guard():
    guard = training.LossGuard()
    assert guard(2.5) and guard(20.0) and not guard(26.0)  # limit: 10 x max(ln 10, first loss 2.5)
    assert not guard(float("nan")) and not guard(float("inf"))
    assert not training.LossGuard()(float("nan"))
    low = training.LossGuard()
    low(0.4)  # a QAT stage starts low: the floor ln(10) keeps ordinary noise from tripping it
    assert low(5.0) and not low(24.0)


@pytest.mark.parametrize("size, stride, dead", [(1, 1, True), (2, 2, True), (2, 1, False), (4, 1, False)])
def test_cutting_dead_taps_keeps_outputs_and_gradients(size, stride, dead):
    """A 3x3 conv (padding 1) on a 1x1 or 2x2 map: the cut kernel gives the plain conv's outputs and gradients."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=stride, padding=1)
    x = torch.randn(4, 6, size, size, requires_grad=True)
    ref = conv(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, conv.weight, conv.bias))
    with training.dead_taps_cut(conv, x[:1].detach()) as cut:
        assert "_conv_forward" in conv.__dict__ if cut else "_conv_forward" not in conv.__dict__
        out = conv(x)
        grads = torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias))
    assert cut == ([""] if dead else [])  # stride 1 on a 2x2 map: every tap meets the input at some output
    assert "_conv_forward" not in conv.__dict__  # the module is plain again after the block
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("name, cut", [("resnet18", ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1",
                                                     "layer4.1.conv2"]), ("mobilenet_v2", [])])
def test_dead_taps_are_cut_in_resnet18_layer4_only(name, cut):
    model = models.create_model(name).train()
    with training.dead_taps_cut(model, torch.zeros(1, 3, 32, 32)) as found:
        assert found == cut
    assert model.training  # the map-size pass ran in eval mode and left the mode as it was


def test_qat_convs_are_cut_too_with_the_same_outputs_and_gradients_and_no_state_moved():
    """QAT's fused convs (ConvBn2d, ConvBnReLU2d) call the same _conv_forward: cut, they compute what the plain QAT
    model computes; entering the block feeds no observer and no BN statistic (the map sizes come from a copy)."""
    torch.manual_seed(0)
    model = models.create_model("resnet18")
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # zero-initialised BN: no signal
        nn.init.uniform_(bn.weight, 0.5, 1.5)
    models.prepare_quantization(model, qat=True)
    model.apply(tq.disable_fake_quant)  # rounding to the int8 grid would turn last-bit differences into steps
    plain, before = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with training.dead_taps_cut(model, x[:1]) as cut:
        assert cut == ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    ref = plain(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(plain.parameters()))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):  # equal up to rounding, which 20 training-mode BN layers amplify elementwise
        assert (g - r).norm() <= 1e-4 * r.norm()


def test_a_last_batch_of_one_image_trains_and_is_said_once(data_dir, tmp_path, capsys):
    """65 images in batches of 64: the lone last image is left out (ResNet18's 1x1 maps cannot batch-normalise it)."""
    args = cifar.parse_args(["--model", "resnet18", "--epochs", "1", "--qat-epochs", "1", "--batch-size", "64",
                             "--train-subset", "65", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path)])
    splits = cifar.load_data(args)
    fp32, history = cifar.train_float(args, splits, torch.device("cpu"), tmp_path)
    _, qat_history = eager.train_qat(fp32, history, splits, args, torch.device("cpu"), tmp_path)
    assert capsys.readouterr().out.count("leave a last batch of 1, too few for batch norm") == 1
    assert len(history) == len(qat_history) == 1 and all(math.isfinite(h["loss"]) for h in history + qat_history)
