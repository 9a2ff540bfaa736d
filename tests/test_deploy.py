"""The deploy stage's pieces on synthetic forms: recommendation, verification, interleaved timing, notes."""
import sys
from types import SimpleNamespace

import pytest
import torch

import data
import deploy
import report


def form(name, precision, medians, verified=True, threads=1):
    return dict(name=name, precision=precision, verified=verified, threads=threads,
                latency_ms={b: dict(median=m, p90=m * 1.1) for b, m in medians.items()},
                images_per_s_per_core={b: int(b) * 1000 / m / threads for b, m in medians.items()})


def test_recommendation_is_the_fastest_verified_form_of_each_precision():
    rows = [form("fast_but_wrong", "int8", {"1": 0.1, "64": 1.0}, verified=False),
            form("int8_a", "int8", {"1": 0.5, "64": 8.0}),
            form("int8_b", "int8", {"1": 0.7, "64": 6.0}),
            form("int8_split", "int8", {"64": 5.0}),  # timed at batch 64 only (the throughput hint's kind)
            form("fp32_a", "fp32", {"1": 1.5, "64": 30.0}),
            form("fp32_b", "fp32", {"1": 1.0, "64": 40.0}),
            form("bf16", "bf16", {"1": 0.2, "64": 2.0})]  # neither int8 nor fp32: never recommended
    recommended, ratio = deploy.recommend(rows, [1, 64])
    assert recommended == {"1": {"int8": "int8_a", "fp32": "fp32_b"}, "64": {"int8": "int8_split", "fp32": "fp32_a"}}
    assert ratio == pytest.approx({"1": 1.0 / 0.5, "64": 30.0 / 5.0})


def test_no_verified_form_of_a_precision_gives_no_pick_and_no_ratio():
    recommended, ratio = deploy.recommend([form("int8", "int8", {"1": 0.1}, verified=False),
                                          form("fp32", "fp32", {"1": 1.0})], [1])
    assert recommended == {"1": {"fp32": "fp32"}} and ratio == {}
    lines = report.recommendation_lines(dict(recommended=recommended, speedup={"best_int8_vs_best_fp32": ratio},
                                             deploy=[form("fp32", "fp32", {"1": 1.0})]))
    assert lines == ["recommended at batch 1: no verified int8 form, fp32 fp32 (1.000 ms)",
                     "per core at batch 1: no verified int8 form, no verified fp32 form"]


def test_per_core_recommendation_counts_the_threads_a_form_takes():
    """Serving single requests, one instance per core: a 1-thread form slower than its 2-thread twin can still
    serve more images per core."""
    rows = [form("int8_2t", "int8", {"1": 0.30, "64": 4.0}, threads=2),
            form("int8_1t", "int8", {"1": 0.35, "64": 7.0}),
            form("fp32_2t", "fp32", {"1": 0.50, "64": 16.0}, threads=2),
            form("fp32_1t", "fp32", {"1": 0.90, "64": 30.0})]
    latency, _ = deploy.recommend(rows, [1, 64])
    per_core, ratio = deploy.recommend(rows, [1, 64], per_core=True)
    assert latency == {"1": {"int8": "int8_2t", "fp32": "fp32_2t"}, "64": {"int8": "int8_2t", "fp32": "fp32_2t"}}
    assert per_core == {"1": {"int8": "int8_1t", "fp32": "fp32_1t"}, "64": {"int8": "int8_1t", "fp32": "fp32_1t"}}
    assert ratio == pytest.approx({"1": 0.90 / 0.35, "64": 30.0 / 7.0})  # the images per core, int8 over fp32
    lines = report.recommendation_lines(dict(recommended=latency, recommended_per_core=per_core, deploy=rows,
                                             speedup={"per_core_best_int8_vs_best_fp32": ratio}))
    assert lines[1] == ("per core at batch 1: int8 int8_1t (2857 img/s/core), fp32 fp32_1t (1111 img/s/core): "
                        "int8 2.57x the images per core of the best fp32")


def test_verification_rejects_a_form_that_disagrees_or_fails():
    images = torch.randint(0, 256, (70, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(70) % 10
    batches = iter(labels.split(32))

    def good(x):  # the reference's classes, batch by batch (the last batch padded to 32)
        y = next(batches)
        return torch.nn.functional.one_hot(torch.cat([y, y.new_zeros(len(x) - len(y))]), 10).float()

    def broken(x):
        raise RuntimeError("unsupported op\nmore detail")

    wrong = lambda x: torch.zeros(len(x), 10)  # always class 0: agreement 0.1
    forms = [dict(name=n, precision="int8", runs={1: f, 32: f}) for n, f in
             (("good", good), ("wrong", wrong), ("broken", broken))]
    deploy.verify_forms(forms, {"test": (images, labels)}, {"int8": labels})
    good_f, wrong_f, broken_f = forms
    assert good_f["verified"] and good_f["agreement"] == 1.0 and good_f["top1"] == 1.0 and good_f["note"] == ""
    assert not wrong_f["verified"] and "agreement 0.1000 < 0.99" in wrong_f["note"] and "top-1" in wrong_f["note"]
    assert not broken_f["verified"] and broken_f["top1"] is None
    assert broken_f["note"] == "failed on the test set (RuntimeError: unsupported op)"


def test_fixed_batch_prediction_pads_the_last_batch_and_drops_the_padding():
    images = torch.randint(0, 256, (70, 32, 32, 3), dtype=torch.uint8)
    sizes = []
    run = lambda x: (sizes.append(len(x)), x.mean((2, 3)).repeat(1, 4)[:, :10])[1]
    preds = deploy.predict_fixed_batch(run, images, 32)
    assert sizes == [32, 32, 32] and len(preds) == 70
    assert torch.equal(preds, data.normalize(images).mean((2, 3)).repeat(1, 4)[:, :10].argmax(1))


def test_timing_interleaves_the_forms_in_rounds():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "ab"}
    times = deploy.time_interleaved(fns, warmup=2, runs=6, rounds=3)
    # warm-up, then 3 rounds in which each fn makes one untimed call and 2 timed ones, in turn
    assert order == list("aabb") + list("aaabbb") * 3
    assert set(times) == {"a", "b"} and all(0 < t["median"] <= t["p90"] for t in times.values())


def test_a_missing_runtime_or_an_unloadable_file_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    (tmp_path / "fp32.onnx").write_bytes(b"not an onnx file")
    args = SimpleNamespace(deploy_runtimes=["onnxruntime", "openvino"], bench_batch_sizes=[1, 64], threads=1,
                           weight_bits=8)
    forms, notes = deploy.deploy_forms(torch.nn.Identity(), tmp_path, args)
    assert forms == []
    assert notes[0] == "openvino is not installed (pip install -r requirements.txt): its forms are not timed"
    assert notes[1].startswith("onnxruntime_fp32: could not be loaded (")
    assert notes[2].startswith("onnxruntime_int8: could not be loaded (")  # int8.onnx does not exist
    assert all("\n" not in n for n in notes)


def test_a_reference_of_one_class_is_a_note(monkeypatch):
    args = SimpleNamespace(deploy_runtimes=[], bench_batch_sizes=[1], threads=1, bench_warmup=0, bench_runs=1)
    images, labels = torch.zeros(4, 32, 32, 3, dtype=torch.uint8), torch.arange(4)
    monkeypatch.setattr(deploy, "deploy_forms", lambda *a: ([], []))
    result = deploy.run(None, {"fp32": torch.tensor([0, 1, 2, 2]), "int8": torch.zeros(4, dtype=torch.long)},
                        {"test": (images, labels)}, None, args)
    assert result["deploy_notes"] == ["the int8 reference predicts one class for every test image, so agreement "
                                      "checks nothing: train longer before choosing a form"]
