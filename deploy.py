"""Every deployable form of the fp32 and int8 models (PyTorch's engines, ONNX Runtime, OpenVINO), loaded from the saved
files as a user would: the runtimes' sessions, verification on the test set, interleaved timing and the
recommendation of the fastest verified form. The files themselves come from cifar.py's stages and export.py."""
import copy
import math
import time

import numpy as np
import torch
from tqdm import tqdm

import models
from data import normalize
from training import top1

RUNTIMES = ("torch", "onnxruntime", "openvino")
# A form is verified when it predicts the class of its precision's reference for this share of the test images
# and its top-1 is this close to the reference's; only verified forms are recommended.
AGREEMENT_MIN, TOP1_TOLERANCE = 0.99, 0.002
BENCH_ROUNDS = 5  # interleaved rounds; --bench-runs calls per form are spread over them
BENCH_SETTLE_S = 0.01  # pause before each form's turn: the runtime timed before stops spinning its threads


# ---------------------------------------------------------------- runtimes

def ort_session(model, threads):
    """An ONNX Runtime CPU session for a file path or an in-memory ModelProto."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def ort_predict(model, images, threads, batch_size=500):
    session = ort_session(model, threads)
    return torch.cat([torch.from_numpy(session.run(None, {"input": normalize(images[i:i + batch_size])
                                                          .contiguous().numpy()})[0]).argmax(1)
                      for i in range(0, len(images), batch_size)])


def openvino_compile(path, threads, batch, hint="LATENCY", precision=None):
    """An OpenVINO CPU model compiled from an ONNX file for a fixed batch size (static shapes ran faster than the
    file's dynamic batch: docs/experiments.md). precision: INFERENCE_PRECISION_HINT; by default OpenVINO runs fp32
    layers in bf16 on CPUs that have it. Returns (compiled model, settings as OpenVINO reports them)."""
    import openvino as ov
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape([batch, 3, 32, 32])
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": hint}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(model, "CPU", config)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    settings = dict(hint=hint, threads=threads, precision=precision,
                    streams=int(compiled.get_property("NUM_STREAMS")), static_batch=True)
    return compiled, settings


def openvino_runner(compiled):
    """fn(x) -> logits: one synchronous request (the latency hint's way)."""
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x.numpy()})[0]


def openvino_parallel_runner(compiled, parts):
    """fn(x) -> logits: x split into `parts` equal requests run at once on the throughput hint's streams."""
    import openvino as ov
    queue, out = ov.AsyncInferQueue(compiled, parts), [None] * parts
    queue.set_callback(lambda request, i: out.__setitem__(i, request.get_output_tensor(0).data.copy()))

    def run(x):
        for i, chunk in enumerate(x.numpy().reshape(parts, -1, *x.shape[1:])):
            queue.start_async({0: chunk}, i)
        queue.wait_all()
        return np.concatenate(out)
    return run


def int8_layer_diffs(path, x, threads):
    """Where OpenVINO's integers depart from ONNX Runtime's (which equal PyTorch int8's) on one int8 ONNX file: for
    every activation QuantizeLinear -> DequantizeLinear pair, in graph order, the share of elements whose integer
    differs and the largest difference in steps, both runtimes given the batch x. [{tensor, differ, max_steps}]"""
    import onnx
    import openvino as ov
    from onnx import numpy_helper
    graph = onnx.load(str(path))
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.graph.node
                 if n.op_type == "Constant"}
    constants.update({t.name: numpy_helper.to_array(t) for t in graph.graph.initializer})
    made_by = {out: n for n in graph.graph.node for out in n.output}
    pairs = [(n.output[0], float(constants[n.input[1]])) for n in graph.graph.node if n.op_type == "DequantizeLinear"
             and getattr(made_by.get(n.input[0]), "op_type", None) == "QuantizeLinear"]
    graph.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name, _ in pairs)
    session = ort_session(graph, threads)
    reference = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape(list(x.shape))
    model.add_outputs([name for name, _ in pairs])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
    result = compiled(x)
    got = {name: result[o] for o in compiled.outputs for name in o.get_names()}
    rows = []
    for name, scale in pairs:
        steps = np.abs(np.round(got[name] / scale) - np.round(reference[name] / scale))
        rows.append(dict(tensor=name, differ=float((steps > 0).mean()), max_steps=int(steps.max())))
    return rows


# ---------------------------------------------------------------- forms

def fp32_candidates(fp32_model):
    """Plain-PyTorch CPU forms of the fp32 model besides eager NCHW.

    Which wins depends on the model and batch size (measured), so all are timed rather than one assumed.
    """
    nchw = copy.deepcopy(fp32_model).eval()
    nhwc = copy.deepcopy(fp32_model).eval().to(memory_format=torch.channels_last)
    to_nhwc = lambda f: lambda x: f(x.contiguous(memory_format=torch.channels_last))
    with torch.no_grad():
        return {"torchscript_frozen": models.to_torchscript(nchw),
                "torchscript_optimized": torch.jit.optimize_for_inference(models.to_torchscript(nchw)),
                "torchscript_optimized_channels_last":
                    to_nhwc(torch.jit.optimize_for_inference(models.to_torchscript(nhwc))),
                "eager_channels_last": to_nhwc(nhwc)}


def on_engine(module, engine, threads):
    pinned = on_threads(module, threads)

    def run(x):
        torch.backends.quantized.engine = engine  # some quantized ops (add, pooling) read it when they run
        return pinned(x)
    return run


def on_threads(module, threads):
    """module(x) on `threads` of torch's one process-wide pool, set when the form before used another count."""
    def run(x):
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return module(x)
    return run


def deploy_forms(fp32_model, out, args):
    """Every deployable form of fp32 and int8, loaded from the saved files the way a user would load them.

    Returns (forms, notes): forms are dicts {name, runtime, engine, settings, precision, reference, runs:
    {batch: fn(x)}}, reference naming the model whose predictions the form must reproduce ("fp32", "int8": eager,
    "int8_pt2e"); a runtime that is not installed or a file it cannot load gives a note instead of a form."""
    forms, notes, sizes = [], [], args.bench_batch_sizes
    flows = {"eager": ["eager"], "pt2e": ["pt2e"], "both": ["eager", "pt2e"]}[getattr(args, "flow", "eager")]

    def add(name, runtime, precision, make, engine=None, reference=None):
        try:
            runs, settings = make()
        except Exception as e:  # a form that cannot be built is reported, never fatal
            notes.append(f"{name}: could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            return
        if runs:  # a throughput form exists only where a batch splits into its streams
            forms.append(dict(name=name, runtime=runtime, engine=engine, settings=settings, precision=precision,
                              reference=reference or {"bf16": "fp32"}.get(precision, precision),
                              threads=settings["threads"], runs=runs))

    def installed(runtime, package):
        try:
            __import__(package)
            return True
        except ImportError:
            notes.append(f"{runtime} is not installed (pip install -r requirements.txt): its forms are not timed")
            return False

    # int8_w4.onnx (--weight-bits 4) is int8.onnx with 4-bit-stored weights: timed too, since the runtimes run
    # it differently (docs/experiments.md)
    # (form name, file, reference) per ONNX file
    onnx_files = [("fp32", "fp32.onnx", "fp32")] + [("int8", "int8.onnx", "int8")] * ("eager" in flows) + [
        ("int8_w4", "int8_w4.onnx", "int8")] * (args.weight_bits == 4) + [
        ("pt2e_int8", "int8_pt2e.onnx", "int8_pt2e")] * ("pt2e" in flows)
    ov_variants = []  # (form name, file, reference, OpenVINO's inference precision)
    if "openvino" in args.deploy_runtimes and installed("openvino", "openvino"):
        import openvino as ov
        ov_variants = [("fp32", "fp32.onnx", "fp32", "f32")] + [(*f, None) for f in onnx_files if f[0] != "fp32"]
        if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):  # OpenVINO's default there
            ov_variants.append(("bf16", "fp32.onnx", "fp32", "bf16"))
    with_ort = "onnxruntime" in args.deploy_runtimes and installed("onnxruntime", "onnxruntime")
    # Every form runs with --threads threads and, named *_1thread, with one: a server of single requests runs one
    # instance per core, and int8 at batch 1 gains little from a second thread where fp32 does.
    for n in sorted({args.threads, 1}, reverse=True):
        suffix, threads = ("" if n == args.threads else "_1thread"), dict(threads=n)
        if "torch" in args.deploy_runtimes:
            # One loaded copy per batch size, as a server of one batch size has: oneDNN's int8 kernels ran batch 1
            # 3x slower in a copy that had run batch 64 first (docs/experiments.md).
            for engine in [e for e in torch.backends.quantized.supported_engines if e != "none" and "eager" in flows]:
                def load(engine=engine, n=n):  # TorchScript re-packs the int8 weights for the engine set at load
                    torch.backends.quantized.engine = engine
                    return {b: on_engine(torch.jit.load(out / "int8.pt"), engine, n) for b in sizes}, threads
                add(f"torch_int8_{engine}{suffix}", "torch", "int8", load, engine=engine)
            torch.backends.quantized.engine = models.ENGINE
            copies = {b: {"eager": copy.deepcopy(fp32_model).eval(), **fp32_candidates(fp32_model)} for b in sizes}
            for form in copies[sizes[0]]:
                add(f"torch_fp32_{form}{suffix}", "torch", "fp32", lambda form=form, n=n, threads=threads: (
                    {b: on_threads(copies[b][form], n) for b in sizes}, dict(threads, form=form)))
            if "pt2e" in flows:  # the AOTInductor packages, also one loaded copy per batch size
                for name, file, reference in (("pt2e_int8", "int8_pt2e.pt2", "int8_pt2e"),
                                              ("fp32", "fp32.pt2", "fp32")):
                    def load(file=file, n=n, threads=threads):
                        return ({b: on_threads(torch._inductor.aoti_load_package(str(out / file)), n) for b in sizes},
                                dict(threads, form="aoti"))
                    add(f"torch_{name}_aoti{suffix}", "torch", reference.split("_")[0], load, engine="inductor",
                        reference=reference)
        if with_ort:
            for name, file, reference in onnx_files:
                def load(file=file, n=n, threads=threads):
                    session = ort_session(out / file, n)
                    run = lambda x: session.run(None, {"input": x.numpy()})[0]
                    return {b: run for b in sizes}, dict(threads, graph_optimization="all")
                add(f"onnxruntime_{name}{suffix}", "onnxruntime", reference.split("_")[0], load, reference=reference)
        for name, file, reference, hint_precision in ov_variants:
            def latency(file=file, hint_precision=hint_precision, n=n):
                compiled = {b: openvino_compile(out / file, n, b, "LATENCY", hint_precision) for b in sizes}
                return {b: openvino_runner(c) for b, (c, _) in compiled.items()}, compiled[sizes[0]][1]
            add(f"openvino_{name}{suffix}", "openvino", "bf16" if name == "bf16" else reference.split("_")[0], latency,
                reference=reference)
    for name, file, reference, hint_precision in [v for v in ov_variants if v[0] in ("fp32", "int8", "pt2e_int8")]:
        # the throughput hint (fp32 and each flow's int8 file) splits the CPU into streams: a batch is cut into one
        # request per stream
        def throughput(file=file, hint_precision=hint_precision):
            _, probe = openvino_compile(out / file, args.threads, 1, "THROUGHPUT", hint_precision)
            n = probe["streams"]
            fit = [b for b in sizes if n > 1 and b % n == 0]
            if max(sizes) not in fit:  # verification runs at the largest batch size
                return {}, probe
            runs = {b: openvino_parallel_runner(openvino_compile(
                out / file, args.threads, b // n, "THROUGHPUT", hint_precision)[0], n) for b in fit}
            return runs, dict(probe, requests_per_batch=n)
        add(f"openvino_{name}_throughput", "openvino", reference.split("_")[0], throughput, reference=reference)
    torch.set_num_threads(args.threads)
    return forms, notes


# ---------------------------------------------------------------- verification

def predict_fixed_batch(run, images, batch):
    """Predicted classes from run(x) -> logits, always called with exactly `batch` images (the last batch padded
    with zeros), as a model compiled for one shape needs."""
    preds = []
    for i in range(0, len(images), batch):
        x = normalize(images[i:i + batch])
        n = len(x)
        x = torch.cat([x, x.new_zeros(batch - n, *x.shape[1:])]).contiguous()
        preds.append(torch.as_tensor(np.asarray(run(x)))[:n].argmax(1))
    return torch.cat(preds)


def verify_forms(forms, data, references):
    """Top-1 and agreement of every form on the whole test set, called at the largest benchmark batch size.

    references: {form["reference"]: test-set predictions}; fills top1, agreement, verified, note."""
    images, labels = data["test"]
    ref_top1 = {p: top1(preds, labels) for p, preds in references.items()}
    with torch.inference_mode():
        for f in tqdm(forms, desc="verify", leave=False, disable=None):
            batch = max(f["runs"])
            try:
                preds = predict_fixed_batch(f["runs"][batch], images, batch)
            except Exception as e:
                f.update(top1=None, agreement=None, verified=False,
                         note=f"failed on the test set ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                continue
            ref = f.get("reference") or {"bf16": "fp32"}.get(f["precision"], f["precision"])
            f["top1"], f["agreement"] = top1(preds, labels), top1(preds, references[ref])
            problems = ([f"agreement {f['agreement']:.4f} < {AGREEMENT_MIN}"] if f["agreement"] < AGREEMENT_MIN
                        else []) + ([f"top-1 {f['top1']:.4f} vs the reference's {ref_top1[ref]:.4f}"]
                                    if abs(f["top1"] - ref_top1[ref]) > TOP1_TOLERANCE + 1e-9 else [])
            f["verified"], f["note"] = not problems, "; ".join(problems)


# ---------------------------------------------------------------- timing

def _call_times(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return times


def _stats(times):
    return dict(median=float(np.median(times)), p90=float(np.percentile(times, 90)))


def time_it(fn, warmup, runs):
    """Median and 90th percentile of runs timed calls, in ms, after warmup calls."""
    for _ in range(warmup):
        fn()
    return _stats(_call_times(fn, runs))


def time_interleaved(fns, warmup, runs, rounds=5, settle_s=0.0):
    """time_it for every fn of {name: fn} in one process: after warm-up, `rounds` rounds in each of which every fn
    makes runs / rounds timed calls in turn, so that a slow spell of the machine touches all forms alike.

    Each call is timed on its own (time.perf_counter): torch.utils.benchmark's blocked_autorange reports means of
    blocks of calls, which hide the per-call tail that the p90 is for. Before each fn's calls of a round: a pause of
    settle_s (the thread pools of the runtime timed before stop spinning) and one untimed call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(settle_s)
            fn()
            times[name] += _call_times(fn, max(1, math.ceil(runs / rounds)))
    return {name: _stats(t) for name, t in times.items()}


def time_forms(forms, args):
    """Latency (median, p90 in ms) of every form at each batch size, all forms interleaved in this process, and the
    images per second per core that median gives (batch / latency / threads)."""
    with torch.inference_mode():
        for b in args.bench_batch_sizes:
            x = torch.randn(b, 3, 32, 32)
            ran = [f for f in forms if b in f["runs"] and f["top1"] is not None]
            times = time_interleaved({f["name"]: (lambda run=f["runs"][b]: run(x)) for f in ran},
                                     args.bench_warmup, args.bench_runs, BENCH_ROUNDS, BENCH_SETTLE_S)
            for f in ran:
                f.setdefault("latency_ms", {})[str(b)] = times[f["name"]]
                f.setdefault("images_per_s_per_core", {})[str(b)] = b * 1000 / times[f["name"]]["median"] / f["threads"]
    torch.backends.quantized.engine = models.ENGINE
    torch.set_num_threads(args.threads)


# ---------------------------------------------------------------- recommendation

def recommend(deploy, batch_sizes, per_core=False):
    """The best *verified* form of each precision at each batch size, and the best int8 against the best fp32: the
    fastest (latency), or per_core the most images per second per core (serving: one instance per `threads` cores).

    deploy: report["deploy"] rows. Returns ({batch: {precision: name}}, {batch: fp32 cost / int8 cost}), the cost
    being the median latency, per_core the core-milliseconds per image."""
    def cost(f, b):
        return f["latency_ms"][b]["median"] * (f["threads"] / int(b) if per_core else 1)
    recommended, ratio = {}, {}
    for b in map(str, batch_sizes):
        best = {}
        for precision in ("int8", "fp32"):
            ok = [f for f in deploy if f["precision"] == precision and f["verified"] and b in f["latency_ms"]]
            if ok:
                best[precision] = min(ok, key=lambda f: cost(f, b))
        recommended[b] = {p: f["name"] for p, f in best.items()}
        if len(best) == 2:
            ratio[b] = cost(best["fp32"], b) / cost(best["int8"], b)
    return recommended, ratio


def run(fp32_model, references, data, out, args):
    """Stage 7: build, verify and time every form; returns the report's deploy entries.

    references: {"fp32", "int8" (eager), "int8_pt2e": test-set predictions of the model each form must reproduce}."""
    forms, notes = deploy_forms(fp32_model, out, args)
    for note in notes:
        print(f"note: {note}")
    print(f"deploy: {len(forms)} forms ({', '.join(sorted({f['runtime'] for f in forms}))}): verified on "
          f"{len(data['test'][1])} test images, then timed at batch {', '.join(map(str, args.bench_batch_sizes))}",
          flush=True)
    for precision, preds in references.items():
        if len(preds.unique()) == 1:  # then any form "agrees": the check proves nothing
            notes.append(f"the {precision} reference predicts one class for every test image, so agreement checks "
                         f"nothing: train longer before choosing a form")
            print(f"note: {notes[-1]}")
    verify_forms(forms, data, references)
    time_forms(forms, args)
    rows = [dict({k: v for k, v in f.items() if k != "runs"}, latency_ms=f.get("latency_ms", {}),
                 images_per_s_per_core=f.get("images_per_s_per_core", {})) for f in forms]
    recommended, best = recommend(rows, args.bench_batch_sizes)
    per_core, best_per_core = recommend(rows, args.bench_batch_sizes, per_core=True)
    median = {f["name"]: {b: v["median"] for b, v in f["latency_ms"].items()} for f in rows}

    def ratio(slow, fast):  # the fastest of the forms `slow` against the form `fast`, per batch size
        slow = [n for n in slow if n in median]
        return ({b: min(median[n][b] for n in slow) / m for b, m in median[fast].items()}
                if slow and fast in median else None)
    # the earlier headline: int8 against the fastest plain-PyTorch fp32 form other than eager NCHW
    compiled = [n for n in median if n.startswith("torch_fp32_") and n != "torch_fp32_eager"
                and not n.endswith("_1thread")]
    int8 = f"torch_int8_{models.ENGINE}"
    speedup = dict(best_int8_vs_best_fp32=best, per_core_best_int8_vs_best_fp32=best_per_core,
                   int8_vs_fp32=ratio(compiled, int8),
                   int8_vs_fp32_eager=ratio(["torch_fp32_eager"], int8),
                   int8_onnx_vs_fp32_onnx=ratio(["onnxruntime_fp32"], "onnxruntime_int8"))
    settings = dict(threads=args.threads, warmup=args.bench_warmup, runs=args.bench_runs, rounds=BENCH_ROUNDS,
                    settle_s=BENCH_SETTLE_S,
                    verify_batch=max(args.bench_batch_sizes), images=len(data["test"][1]), agreement_min=AGREEMENT_MIN,
                    top1_tolerance=TOP1_TOLERANCE,
                    references={"int8": f"torch int8 ({models.ENGINE}, the converted model)",
                                "int8_pt2e": "torch PT2E int8 (the converted graph)", "fp32": "torch fp32 eager"})
    return dict(deploy=rows, recommended=recommended, recommended_per_core=per_core,
                speedup={k: v for k, v in speedup.items() if v is not None}, deploy_settings=settings,
                deploy_notes=notes)
