"""The PT2E flow on a small network written without QuantStub, fuse_model or FloatFunctional: QAT switches, bias grid,
conversion and the AOTInductor package loaded without project code."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import pt2e


class Plain(nn.Module):
    """conv-bn-relu, a residual add written as +, pooling and a linear layer: nothing quantization-specific."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(scope="module")
def trained():
    """Plain's QAT model after a few steps on random images, ranges and batch norm frozen."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    qat = pt2e.prepare_qat(Plain(), reduce_range=False)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    qat.train()
    for step in range(6):
        if step == 3:
            qat.observe(False)
            qat.freeze_bn()
        loss = qat(x).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qat, x


@pytest.fixture(scope="module")
def int8(trained):
    """trained's int8 reference, converted once (~5 s: convert_pt2e traces its conv-bn patterns on every call)."""
    return pt2e.convert(trained[0])


@pytest.fixture(scope="module")
def onnx_graph(int8):
    return pt2e.export_onnx(int8)


def batch_norm_args(qat):
    return [n.args[5] for n in qat.graph.graph.nodes if n.target is torch.ops.aten.batch_norm.default]


def test_freeze_bn_holds_the_statistics_in_training(trained):
    qat, x = trained
    qat.train()
    assert batch_norm_args(qat) == [False, False]  # frozen: training mode no longer uses the batch statistics
    before = {k: v.clone() for k, v in qat.state_dict().items() if "running" in k}
    assert len(before) == 4
    qat(x).sum().backward()
    assert all(torch.equal(v, qat.state_dict()[k]) for k, v in before.items())
    qat.eval()
    assert batch_norm_args(qat) == [False, False]


def test_a_fresh_qat_model_trains_its_batch_norm_and_eval_switches_it():
    qat = pt2e.prepare_qat(Plain(), reduce_range=False)
    assert batch_norm_args(qat.train()) == [True, True]
    assert batch_norm_args(qat.eval()) == [False, False]
    assert batch_norm_args(qat.train()) == [True, True]


def test_observe_off_holds_the_ranges(trained):
    qat, x = trained
    scales = {k: v.clone() for k, v in qat.state_dict().items() if k.endswith(".scale")}
    assert scales
    qat.train()
    qat(x * 10)
    assert all(torch.equal(v, qat.state_dict()[k]) for k, v in scales.items())


def test_converted_model_agrees_with_the_fake_quant_model(trained, int8):
    qat, x = trained
    with torch.no_grad():
        fake, real = qat.eval()(x), int8(x)
    assert (fake.argmax(1) == real.argmax(1)).float().mean() >= 0.95
    assert torch.allclose(fake, real, atol=0.1 * fake.abs().max().item())


def test_conversion_folds_every_batch_norm_and_the_skipped_rewrites_match_nothing(trained, int8):
    """pt2e skips torchao's conv-bn rewrites for conv kinds a graph lacks: conv2d's still folds every batch norm,
    and the unwrapped conv1d rewrite, run on the QAT graph, leaves it as it was."""
    assert not [n for n in int8.graph.nodes if "batch_norm" in str(n.target)]
    from torchao.quantization.pt2e import qat_utils
    graph = copy.deepcopy(trained[0].graph)
    before = graph.code
    example = (torch.randn(1, 1, 3), torch.randn(1, 1, 1), *[torch.randn(1)] * 4)
    graph = qat_utils._fold_conv_bn_qat_helper.__wrapped__(graph, torch.nn.functional.conv1d, example, is_cuda=False)
    assert graph.code == before


def test_biases_lie_on_the_int32_grid(int8):
    """Every conv/linear bias is an integer multiple of input scale x weight scale, as ONNX Runtime holds it."""
    checked = 0
    for node in int8.graph.nodes:
        if node.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            x, w, b = node.args[:3]
            step = x.args[1] * pt2e._attr(int8, w.args[1].target).double()
            k = pt2e._attr(int8, b.target).double() / step
            assert torch.allclose(k, k.round(), atol=1e-3), node
            checked += 1
    assert checked == 3


def test_aoti_package_loads_without_project_code(trained, int8, tmp_path):
    x = trained[1]
    pt2e.save_aoti(int8, tmp_path / "m.pt2")
    torch.save(x[:5], tmp_path / "x.pt")
    code = ("import sys, torch\nrunner = torch._inductor.aoti_load_package(sys.argv[1])\n"
            "torch.save(runner(torch.load(sys.argv[2])), sys.argv[3])\n"
            "print(sorted(k for k in sys.modules if k in ('pt2e', 'models', 'utils', 'cifar')))\n")
    proc = subprocess.run([sys.executable, "-c", code, tmp_path / "m.pt2", tmp_path / "x.pt", tmp_path / "y.pt"],
                          capture_output=True, text=True, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "y.pt"), int8(x[:5]), atol=1e-4)


def test_onnx_file_is_checked_and_runs_in_onnx_runtime(trained, int8, onnx_graph):
    import onnxruntime as ort
    x = trained[1]
    session = ort.InferenceSession(onnx_graph.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {"input": x[:7].numpy()})[0])
    with torch.no_grad():
        expected = int8(x[:7])
    assert logits.shape == (7, 10) and (logits.argmax(1) == expected.argmax(1)).float().mean() >= 6 / 7


def test_onnx_runtime_runs_every_layer_in_int8(onnx_graph, tmp_path):
    """In ONNX Runtime's optimized graph every conv, the residual add, the pooling and the linear layer are int8
    kernels: no float Conv, Add, ReduceMean or Gemm is left (ResidualQuantizer and qdq_tail)."""
    import collections
    import onnx
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(onnx_graph.SerializeToString(), opts,
                         providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and ops["QGemm"] == 1, ops
    assert ops["QLinearGlobalAveragePool"] == 1, ops
    assert not {"Conv", "FusedConv", "Add", "ReduceMean", "GlobalAveragePool", "Gemm"} & set(ops), ops


def test_layer_sqnr_compares_each_layer_with_the_qat_models_own_float_network(trained, int8):
    """One figure per conv/linear, named by module path; high against the QAT model's own float network, and it drops
    when one layer's output scale is made 50x coarser (from that layer on)."""
    qat, x = trained
    reference = pt2e.layer_outputs(pt2e.float_counterpart(qat), x, int8=False)
    rows = pt2e.layer_sqnr(reference, int8, x)
    assert [r["layer"] for r in rows] == ["stem.0", "block.0", "fc"]
    assert min(r["sqnr_db"] for r in rows) > 15, rows
    int8 = copy.deepcopy(int8)  # changed below
    dequantize = pt2e._layer_ends(int8, int8=True)["block.0"]  # conv -> quantize -> dequantize
    quantize = dequantize.args[0]
    assert quantize.target is torch.ops.quantized_decomposed.quantize_per_tensor.default
    for node in (quantize, dequantize):
        node.update_arg(1, node.args[1] * 50)
    int8.recompile()
    coarse = {r["layer"]: r["sqnr_db"] for r in pt2e.layer_sqnr(reference, int8, x)}
    assert coarse["stem.0"] == pytest.approx(rows[0]["sqnr_db"])
    assert coarse["block.0"] < rows[1]["sqnr_db"] - 15, (coarse, rows)
