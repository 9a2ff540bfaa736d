"""ONNX files from the eager models: export with the TorchScript exporter, check, simplify (onnxsim), store the weights
in 4 bits (--weight-bits 4), verify in ONNX Runtime over the test set (stage 6) and save. Timing them in ONNX Runtime
and OpenVINO is deploy.py's."""
import io

import numpy as np
import torch

import deploy
import models
import utils
from training import top1


def export_onnx(model, name, opset=17):
    """Export with the TorchScript exporter (in memory), check, simplify with onnxsim.

    Returns (the ONNX ModelProto, {'opset', 'simplified', 'note'}); nothing is written, so a caller saves
    (save_onnx) only what it has verified. A failed simplification keeps the checked unsimplified graph.
    """
    import onnx
    import onnxsim
    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), torch.randn(1, 3, 32, 32), buffer, dynamo=False, opset_version=opset,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    graph = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(graph, full_check=True)
    info = dict(opset=opset, simplified=False, note="")
    try:
        simple, ok = onnxsim.simplify(graph)
        if not ok:
            raise RuntimeError("onnxsim's check found different outputs")
        onnx.checker.check_model(simple, full_check=True)
        graph, info["simplified"] = simple, True
    except Exception as e:
        info["note"] = f"onnxsim failed ({type(e).__name__}: {e}); kept the unsimplified graph"
        print(f"warning: {name}: {info['note']}")
    return graph, info


INT4_OPSET = 21  # the first opset whose DequantizeLinear takes INT4


def pack_int4_weights(graph):
    """A copy of a QDQ int8 graph with its constant int8 weights stored as INT4 initializers, two a byte.

    Packs every DequantizeLinear input that is a constant int8 tensor within [-8, 7] with zero point 0
    (--weight-bits 4); the values, and so the outputs, do not change. Returns (graph, number of tensors packed).
    """
    import ml_dtypes  # onnx's own dependency for its 4-bit types
    import onnx
    from onnx import numpy_helper
    graph = onnx.version_converter.convert_version(graph, INT4_OPSET)
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.graph.node
                 if n.op_type == "Constant" and n.attribute[0].name == "value"}
    packed, initializers = 0, {}
    for node in graph.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        weight, zero_point = constants.get(node.input[0]), constants.get(node.input[2])
        if (weight is None or zero_point is None or weight.dtype != np.int8 or zero_point.any()
                or weight.min() < -8 or weight.max() > 7):
            continue
        for i, values in ((0, weight), (2, zero_point)):  # DequantizeLinear wants both in one type
            name = f"{node.input[i]}_int4"
            initializers.setdefault(name, numpy_helper.from_array(values.astype(ml_dtypes.int4), name))
            node.input[i] = name
        packed += 1
    graph.graph.initializer.extend(initializers.values())
    used = {name for n in graph.graph.node for name in n.input} | {o.name for o in graph.graph.output}
    kept = [n for n in graph.graph.node if n.op_type != "Constant" or n.output[0] in used]
    del graph.graph.node[:]
    graph.graph.node.extend(kept)
    graph.ir_version = max(graph.ir_version, 10)  # INT4 needs IR version 10
    onnx.checker.check_model(graph, full_check=True)
    return graph, packed


def save_onnx(graph, path):
    import onnx
    utils.atomic_write(path, lambda f: onnx.save(graph, f))


def export_and_verify(torch_models, data, out, threads, weight_bits=8):
    """Export each model to ONNX (checked, simplified), run it in ONNX Runtime over the test set, then save it.

    torch_models: {name: (eager model, its test-set predictions)}. With 4-bit weights, int8_w4.onnx is int8.onnx
    with its weights stored in 4 bits. Returns (report entries, paths).
    """
    info, accuracy, agreement, paths, graphs = {}, {}, {}, {}, {}
    for name, (model, _) in torch_models.items():
        graphs[name], info[name] = export_onnx(models.onnx_exportable(model), f"{name}.onnx")
    if weight_bits == 4 and "int8" in graphs:
        graphs["int8_w4"], packed = pack_int4_weights(graphs["int8"])
        info["int8_w4"] = dict(opset=INT4_OPSET, int4_tensors=packed)
        torch_models = dict(torch_models, int8_w4=torch_models["int8"])
    else:  # a 4-bit file left by an earlier run in this folder would no longer match int8.onnx
        (out / "int8_w4.onnx").unlink(missing_ok=True)
    for name, graph in graphs.items():
        ort_preds = deploy.ort_predict(graph, data["test"][0], threads)
        accuracy[f"{name}_onnx"] = top1(ort_preds, data["test"][1])
        agreement[f"{name}_onnx_vs_torch"] = top1(ort_preds, torch_models[name][1])
        paths[name] = out / f"{name}.onnx"
        save_onnx(graph, paths[name])
    return dict(onnx=info, accuracy=accuracy, agreement=agreement), paths
