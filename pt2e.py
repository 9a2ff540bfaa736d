"""The PT2E flow (torchao), eager mode's successor: the float network captured by torch.export and quantized by
X86InductorQuantizer (residual adds quantized as eager mode does), trained (prepare_qat_pt2e) or calibrated
(prepare_pt2e), converted (convert_pt2e); its per-layer error, and its deployable files: an AOTInductor package (.pt2)
and an ONNX file from the dynamo exporter. It needs no QuantStub, fuse_model or FloatFunctional: any network
torch.export can capture goes through. run() is the pipeline's pt2e stage (cifar.py, --flow pt2e|both); deploy.py
verifies and times the files."""
import copy
import functools
import importlib.metadata
import logging
import warnings

import torch
from torch.ao.ns.fx.utils import compute_sqnr

import deploy
import export
import training
import utils
from data import calibration_batches


class _DropRecord(logging.Filter):
    def __init__(self, text):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


# torchao 0.18 registers an Enum as a pytree constant when imported, which torch 2.14 logs as deprecated: that one
# record is dropped (before the import below); every other message stays.
logging.getLogger("torch.utils._pytree").addFilter(_DropRecord("is an Enum subclass and is now natively supported"))
# The dynamo ONNX exporter prints its progress through this warning category's sibling: kept visible. Only the
# converted graph's known note is filtered: inductor copy-constructs the weights' zero points.
warnings.filterwarnings("ignore", message="To copy construct from a tensor")

import torchao  # noqa: E402
import torchao.quantization.pt2e as ao  # noqa: E402
from torchao.quantization.pt2e import qat_utils  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e  # noqa: E402
from torchao.quantization.pt2e.quantizer import get_input_act_qspec, get_output_act_qspec  # noqa: E402
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (  # noqa: E402
    QUANT_ANNOTATION_KEY, X86InductorQuantizer, _is_any_annotated, _X86InductorQuantizationAnnotation,
    get_default_x86_inductor_quantization_config)


def _only_where_present(rewrite):
    """torchao's conv + batch-norm rewrite for one kind of conv, run only on graphs that have that kind.

    prepare_qat_pt2e and convert_pt2e try conv1d, conv2d and both transposed convs, each with up to 12 pattern
    variants that torch.export traces anew on every call: 13 of the 18 s MobileNetV2's convert took went to
    patterns that cannot match. Skipping them changes nothing in the graph (tests/test_pt2e.py)."""
    @functools.wraps(rewrite)
    def run(graph, conv_fn, *args, **kwargs):
        if any(getattr(node.target, "__name__", "").split(".")[0] == conv_fn.__name__ for node in graph.graph.nodes):
            return rewrite(graph, conv_fn, *args, **kwargs)
        return graph
    return run


# private names: a torchao without them runs as it is
for _rewrite in ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper"):
    if hasattr(qat_utils, _rewrite):
        setattr(qat_utils, _rewrite, _only_where_present(getattr(qat_utils, _rewrite)))

TORCHAO, ONNXSCRIPT = torchao.__version__, importlib.metadata.version("onnxscript")
# Any batch size the files will be called with; 1024 bounds what inductor specialises for.
BATCH = torch.export.Dim("batch", min=1, max=1024)
EXAMPLE = (torch.zeros(2, 3, 32, 32),)  # batch 2: export specialises a dimension of size 1


def capture(model, train):
    """model (left as it is) as an ATen graph module with a dynamic batch, in its training or inference form."""
    model = copy.deepcopy(model).cpu().train(train)
    return torch.export.export(model, EXAMPLE, dynamic_shapes=({0: BATCH},)).module()


def needs_reduce_range():
    """torchao's rule for PT2E: 7-bit activations only on CPUs without VNNI, whose u8 x s8 sums overflow int16."""
    from torchao.utils import should_reduce_range
    return should_reduce_range(torch.device("cpu"))


class ResidualQuantizer(X86InductorQuantizer):
    """X86InductorQuantizer with residual adds quantized the way eager mode quantizes them: the conv before an add
    gets a quantized output, and the add (or the relu after it) one of its own.

    X86InductorQuantizer annotates conv -> add (-> relu) as one pattern, for oneDNN's fused sum, and leaves the
    conv's output unquantized; ONNX Runtime and OpenVINO then run such convs in float, with their weights
    dequantized on every call (docs/experiments.md). With both inputs of the add quantized, every conv is a
    QLinearConv there, and inductor still lowers the graph to oneDNN's int8 convolutions."""

    def _no_binary_fusion(self, *args, **kwargs):
        pass

    _annotate_conv2d_binary_unary = _annotate_conv2d_binary = _no_binary_fusion
    _annotate_qat_conv2d_bn_binary_unary = _annotate_qat_conv2d_bn_binary = _no_binary_fusion

    def _annotate_conv2d_fusion_pattern(self, model, config, filter_fn=None):
        super()._annotate_conv2d_fusion_pattern(model, config, filter_fn)
        if config is not None:  # a global config (the only kind set here): every add not yet annotated
            for node in model.graph.nodes:
                if node.target is torch.ops.aten.add.Tensor and not _is_any_annotated([node]):
                    self._annotate_add(node, config)

    @staticmethod
    def _annotate_add(node, config):
        inputs = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        if len(inputs) != 2:
            return
        users = list(node.users)
        relu = users[0] if len(users) == 1 and users[0].target is torch.ops.aten.relu.default else None

        def annotation(output, **kw):
            return _X86InductorQuantizationAnnotation(_annotated=True, _is_output_of_quantized_pattern=output,
                                                      output_qspec=get_output_act_qspec(config) if output else None,
                                                      **kw)
        # add -> relu is quantized after the relu, as eager mode's add_relu; runtimes fold the relu into the add
        node.meta[QUANT_ANNOTATION_KEY] = annotation(relu is None,
                                                     input_qspec_map={a: get_input_act_qspec(config) for a in inputs})
        if relu is not None:
            relu.meta[QUANT_ANNOTATION_KEY] = annotation(True)


def quantizer(qat, reduce_range):
    """X86InductorQuantizer's default config: per-channel symmetric int8 weights, per-tensor uint8 activations
    (7-bit with reduce_range, as eager mode's fbgemm qconfig), inductor's and oneDNN's int8 patterns, residual
    adds quantized on both inputs (ResidualQuantizer)."""
    config = get_default_x86_inductor_quantization_config(is_qat=qat, reduce_range=reduce_range)
    return ResidualQuantizer().set_global(config)


class QATModel(torch.nn.Module):
    """A prepare_qat_pt2e graph that training.fit can drive like an eager model.

    An exported graph has no train()/eval(): here they are torchao's switches of its batch-norm and dropout ops
    (move_exported_model_to_train/eval). freeze_bn keeps batch norm on its running statistics in training as
    well, as eager QAT's freeze_bn_stats does: the `training` argument of every batch_norm op is set to False, the
    way torchao's QAT tutorial freezes it."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph
        self.bn_frozen = False

    def forward(self, x):
        return self.graph(x)

    def train(self, mode=True):
        self.training = mode  # not passed on to the graph, which refuses train()/eval()
        (ao.move_exported_model_to_train if mode else ao.move_exported_model_to_eval)(self.graph)
        if mode and self.bn_frozen:
            for node in self.graph.graph.nodes:
                if node.target is torch.ops.aten.batch_norm.default:
                    node.update_arg(5, False)
            self.graph.recompile()
        return self

    def freeze_bn(self):
        self.bn_frozen = True
        return self.train(self.training)

    def observe(self, on):
        """Let the quantization ranges move (on) or hold them."""
        self.apply(ao.enable_observer if on else ao.disable_observer)


def prepare_qat(fp32_model, reduce_range):
    """fp32_model's QAT form: captured in training form, fake quantization inserted, conv+bn kept trainable."""
    return QATModel(prepare_qat_pt2e(capture(fp32_model, train=True), quantizer(True, reduce_range)))


def inference_model(graph):
    """An exported graph that training.predict can call: eval() works on it (and changes nothing)."""
    ao.allow_exported_model_train_eval(graph)
    torch.nn.Module.train(graph, False)  # the training flags, which exporters check; the ops are inference ones
    return graph


def convert(qat_model):
    """The int8 reference of a QATModel (left as it is): batch norm folded, weights int8, and explicit
    quantize/dequantize ops, run by PyTorch in float arithmetic; the deployable files are compiled from it."""
    graph = copy.deepcopy(qat_model.graph)
    ao.move_exported_model_to_eval(graph)
    graph.apply(ao.disable_observer)
    return inference_model(int32_bias(convert_pt2e(graph)))


def _attr(graph, target):
    module, _, name = target.rpartition(".")
    return getattr(graph.get_submodule(module), name)


def int32_bias(graph):
    """Round every conv/linear bias of a converted graph to the int32 grid (input scale x weight scale), in place.

    PyTorch's reference adds the float bias; ONNX Runtime's and OpenVINO's int8 kernels round it to that grid first,
    and the half-step differences made ONNX Runtime predict another class for 3.6% of the images (a quick
    MobileNetV2 run). On the grid all compute the same integers: eager mode's models.int32_bias, for PT2E graphs."""
    dq_tensor, dq_channel = (torch.ops.quantized_decomposed.dequantize_per_tensor.default,
                             torch.ops.quantized_decomposed.dequantize_per_channel.default)
    for node in graph.graph.nodes:
        if node.target not in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default) or len(node.args) < 3:
            continue
        x, w, b = node.args[:3]
        if not (isinstance(b, torch.fx.Node) and b.op == "get_attr" and getattr(x, "target", None) is dq_tensor
                and getattr(w, "target", None) is dq_channel):
            continue
        bias, step = _attr(graph, b.target), x.args[1] * _attr(graph, w.args[1].target).double()
        with torch.no_grad():
            bias.copy_(torch.round(bias.double() / step) * step)
    return graph


def float_counterpart(qat_model):
    """The QAT model's own float network (for the per-layer error): its weights and batch-norm statistics in
    inference form, fake quantization off."""
    graph = copy.deepcopy(qat_model.graph)
    ao.move_exported_model_to_eval(graph)
    graph.apply(ao.disable_fake_quant)
    graph.apply(ao.disable_observer)
    return inference_model(graph)


# ---------------------------------------------------------------- per-layer error

_LAYERS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


def _layer_ends(graph, int8):
    """{module path of each conv/linear: the node holding that layer's output as the next layer sees it}: after
    batch norm (folded into the conv in int8 graphs) and relu, and in int8 graphs after quantize/dequantize."""
    def follow(node, targets):
        users = list(node.users)
        return users[0] if len(users) == 1 and users[0].target in targets else node
    ends = {}
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.target not in _LAYERS or not stack:
            continue
        end = node
        if not int8:  # QAT graph: conv -> a few ops (weight-scale correction, bias) -> batch_norm
            for _ in range(6):
                if len(end.users) != 1:
                    break
                end = next(iter(end.users))
                if end.target is torch.ops.aten.batch_norm.default:
                    break
            end = end if end.target is torch.ops.aten.batch_norm.default else node
        end = follow(end, (torch.ops.aten.relu.default,))
        quantized = follow(end, (torch.ops.quantized_decomposed.quantize_per_tensor.default,)) if int8 else end
        end = next(iter(quantized.users)) if quantized is not end else end  # the dequantized value
        ends[list(stack.values())[-1][0]] = end
    return ends


def layer_outputs(graph, images, int8):
    """{module path: float output} of every conv/linear layer of an exported graph on images (_layer_ends)."""
    ends = _layer_ends(graph, int8)
    wanted, values = {node: name for name, node in ends.items()}, {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node in wanted:
                values[wanted[node]] = value
            return value
    with torch.no_grad():
        Recorder(graph).run(images)
    return values


def layer_sqnr(reference, int8_model, images):
    """SQNR (dB) of the PT2E int8 graph at each conv/linear layer against reference ({module path: float output} on
    the same images), in network order. The paths are the float model's, as eager mode's layer names."""
    got = layer_outputs(int8_model, images, int8=True)
    return [dict(layer=name, sqnr_db=compute_sqnr(reference[name], value).item())
            for name, value in got.items() if name in reference]


@torch.no_grad()
def calibrate_ptq(fp32_model, batches, reduce_range):
    """The PT2E PTQ int8 reference: captured in inference form (batch norm folded), observers fed `batches`."""
    graph = prepare_pt2e(capture(fp32_model, train=False), quantizer(False, reduce_range))
    for x in batches:
        graph(x)
    return inference_model(int32_bias(convert_pt2e(graph)))


# ---------------------------------------------------------------- deployable files

# Freezing lets inductor fold the int8 weights into constants and pick oneDNN's fused int8 kernels.
AOTI_CONFIG = {"freezing": True}


def save_aoti(model, path):
    """An AOTInductor package of model (a dynamic batch), written atomically: it loads with
    torch._inductor.aoti_load_package(path) and needs no project code."""
    with torch.no_grad():
        program = torch.export.export(copy.deepcopy(model), EXAMPLE, dynamic_shapes=({0: BATCH},))
        utils.atomic_write(path, lambda f: torch._inductor.aoti_compile_and_package(
            program, package_path=f, inductor_configs=AOTI_CONFIG))


def export_onnx(model):
    """model as a checked ONNX ModelProto from the dynamo exporter (torch.export, then onnxscript), with a dynamic
    batch; input "input", output "logits"."""
    import onnx
    with torch.no_grad():
        program = torch.onnx.export(copy.deepcopy(model), EXAMPLE, dynamo=True, verbose=False,
                                    input_names=["input"], output_names=["logits"], dynamic_shapes=({0: BATCH},))
    graph = qdq_tail(program.model_proto)
    onnx.checker.check_model(graph, full_check=True)
    return graph


def qdq_tail(graph):
    """The dynamo exporter's graph with its classifier in the forms ONNX Runtime fuses into int8 ops, as in the eager
    file (QLinearGlobalAveragePool, QGemm); both rewrites are exact, the graph is changed in place.

    - ReduceMean over the two spatial axes of a 4-d tensor (adaptive_avg_pool2d's export) is GlobalAveragePool.
    - A Gemm's float bias between dequantized inputs becomes int32 behind a DequantizeLinear with the input scale x
      weight scale: the form ONNX Runtime's QGemm fusion needs. The values are those int32_bias put on that grid."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    shapes = {v.name: len(v.type.tensor_type.shape.dim)
              for v in onnx.shape_inference.infer_shapes(graph).graph.value_info}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    producer = {out: n for n in graph.graph.node for out in n.output}
    nodes = []
    for node in graph.graph.node:
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        if (node.op_type == "ReduceMean" and keepdims == 1 and len(node.input) == 2 and shapes.get(node.input[0]) == 4
                and sorted(np.asarray(inits.get(node.input[1], [])) % 4) == [2, 3]):
            node = helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name)
        dq = [producer.get(name) for name in node.input[:2]]
        if (node.op_type == "Gemm" and len(node.input) == 3 and node.input[2] in inits
                and all(d is not None and d.op_type == "DequantizeLinear" and d.input[1] in inits for d in dq)):
            scale = (inits[dq[0].input[1]] * inits[dq[1].input[1]]).astype(np.float32).reshape(-1)
            bias = node.input[2]
            values = np.round(inits[bias].astype(np.float64) / scale).astype(np.int32)
            graph.graph.initializer.extend([numpy_helper.from_array(values, bias + "_int32"),
                                            numpy_helper.from_array(scale, bias + "_scale"),
                                            numpy_helper.from_array(np.zeros_like(values), bias + "_zero_point")])
            nodes.append(helper.make_node("DequantizeLinear", [bias + "_int32", bias + "_scale", bias + "_zero_point"],
                                          [bias + "_dequantized"], name=bias + "_dequantize", axis=0))
            node.input[2] = bias + "_dequantized"
        nodes.append(node)
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [i for i in graph.graph.initializer if i.name in used]  # the float bias and the mean's axes
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    return graph


# ---------------------------------------------------------------- the flow's stage (cifar.py: --flow pt2e|both)

def train_qat(fp32_model, earlier, data, args, device, out, ckpt=None, clock=None):
    """PT2E QAT from the same float model with eager QAT's recipe: the same batches, epochs, optimizer and LR
    schedule; the ranges (QATModel.observe) and the BN statistics (QATModel.freeze_bn) frozen after the same epochs.

    earlier: the history rows of the stages before (kept in the checkpoint)."""
    model = prepare_qat(fp32_model, args.pt2e_reduce_range).to(device)
    optimizer, batches, scheduler = training.qat_recipe(model, data, args, device)

    def before_epoch(epoch):
        model.observe(epoch <= args.qat_freeze_observer_after)
        if epoch > args.qat_freeze_bn_after and not model.bn_frozen:
            model.freeze_bn()

    resume = ckpt if ckpt and ckpt["stage"] == "qat_pt2e" and not ckpt.get("restart_qat") else None
    history = training.fit(model, optimizer, scheduler, batches, data, args, device, "qat_pt2e", args.qat_epochs,
                           out, resume, earlier, before_epoch, clock, lambda: model.observe(False))
    model.observe(False)
    return model.cpu(), history


def run(fp32_model, earlier, data, sqnr_images, args, device, out, ckpt=None, clock=None):
    """--flow pt2e|both: QAT, int8 conversion and the PTQ baseline in torchao's PT2E flow from the same float model,
    and its files: qat_pt2e.pt (the QAT graph's state_dict), int8_pt2e.pt2 and fp32.pt2 (AOTInductor packages,
    where torch is among --deploy-runtimes), int8_pt2e.onnx (the dynamo exporter's, verified in ONNX Runtime).
    Returns (report entries, the int8 reference's test-set predictions); the per-layer error is measured on
    sqnr_images (normalized), as eager mode's."""
    (test_images, test_labels), hint = data["test"], training.divergence_hint(args, "qat")
    qat_model, history = train_qat(fp32_model, earlier, data, args, device, out, ckpt, clock)
    training.check_finite(qat_model, "the PT2E QAT model", hint)
    int8_model = convert(qat_model)
    preds = training.predict(int8_model, test_images)
    utils.torch_save(qat_model.state_dict(), out / "qat_pt2e.pt")
    packages = dict(pt2e_int8_aoti="int8_pt2e.pt2", fp32_aoti="fp32.pt2") if "torch" in args.deploy_runtimes else {}
    if packages:  # PyTorch's deploy files, compiled (30-50 s) only where the deploy stage verifies them
        save_aoti(int8_model, out / packages["pt2e_int8_aoti"])
        save_aoti(fp32_model.eval(), out / packages["fp32_aoti"])
    graph = export_onnx(int8_model)
    onnx_preds = deploy.ort_predict(graph, test_images, args.threads)
    export.save_onnx(graph, out / "int8_pt2e.onnx")
    reference = layer_outputs(float_counterpart(qat_model), sqnr_images, int8=False)
    sqnr = dict(pt2e_qat=layer_sqnr(reference, int8_model, sqnr_images))
    qat_top1 = history[-1]["test_acc"] if history else training.accuracy(qat_model, data["test"])
    accuracy = dict(pt2e_qat_fake_quant=qat_top1, pt2e_int8=training.top1(preds, test_labels),
                    pt2e_int8_onnx=training.top1(onnx_preds, test_labels))
    if not args.no_ptq:
        batches = calibration_batches(data["train"][0], args.batch_size, args.ptq_batches, args.seed)
        ptq_model = calibrate_ptq(fp32_model, batches, args.pt2e_reduce_range)
        accuracy["pt2e_ptq_int8"] = training.accuracy(ptq_model, data["test"])
        reference = layer_outputs(capture(fp32_model, train=False), sqnr_images, int8=False)
        sqnr = dict(pt2e_ptq=layer_sqnr(reference, ptq_model, sqnr_images), **sqnr)
    pace = [h["images_per_s"] for h in history]
    return dict(history=history, accuracy=accuracy, layer_sqnr=sqnr,
                agreement=dict(pt2e_int8_onnx_vs_torch=training.top1(onnx_preds, preds)),
                train_images_per_s=dict(qat_pt2e=sum(pace) / len(pace)) if pace else {},
                artifacts=dict(pt2e_qat_state_dict="qat_pt2e.pt", pt2e_int8_onnx="int8_pt2e.onnx", **packages)), preds
