"""What `benchmarks/run.py` measures: workloads, and the rows of each workload.

A workload is a model source plus the input shapes it is timed at. A row is one way a user could
serve that model; every row builds one artifact that runs on named numpy inputs (a runner) and is
timed, checked against the Keras model and sized the same way.

Rows come in three groups:

* ``baseline``: what a user does without tfaccel, ``model.export(path, format="tf_saved_model")``,
  loaded with ``tf.saved_model.load`` and called through its ``serving_default`` signature. Every
  speed-up is relative to this row, at the same shape, in the same run.
* ``tfaccel``: "run these tfaccel pipeline steps" (``tfaccel_row(("export",))``). By default there is
  one row per step in :func:`tfaccel.available_steps`, preceded by the steps that produce its input,
  so a new step shows up as a row without editing this file. A combination is one more chain in a
  workload's ``extra_chains``, e.g. ``("int8", "xla")``. A row can also carry its own step options and a
  hardware condition read from ``tfaccel.compat`` (``tfaccel_row(chain, name, options, requires)``; e.g.
  ``mixed_bfloat16`` exported with Keras' einsums, a row only where bf16 is native).
* ``peer``: rows whose artifact runs in another runtime (today onnxruntime, fp32 and dynamic int8).
  They are built with tfaccel's own onnx / ort-int8 steps (tf2onnx on the tfaccel export, opset 17),
  so they are chains like the above, only grouped and labelled differently.

A step that does not apply to a workload (``generate`` on BERT, TensorRT without a GPU) gives a row
with status "n/a" and the reason, not a failure. Causal LMs also get generation rows: keras-hub's
own ``generate`` and, for steps that export a ``generate_greedy`` signature, that signature.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Options per step name, used whenever a row runs that step (a workload can override them).
STEP_OPTIONS: dict[str, dict[str, Any]] = {"onnx": {"opset": 17}}

# Chains beyond one row per step, where they say something: structured pruning composes with the xla and
# int8 steps (issue: "it combines with the xla and int8 steps").
COMBINATIONS: tuple[tuple[str, ...], ...] = (("prune-structured", "xla"), ("prune-structured", "int8"))

# Readable names for chains of steps; any other chain is called "tfaccel <step> + <step>".
ROW_LABELS: dict[tuple[str, ...], str] = {
    ("export",): "tfaccel export",
    ("export", "onnx"): "onnxruntime fp32",
    ("export", "onnx", "ort-int8"): "onnxruntime dynamic int8",
    ("onnx-decoder",): "onnxruntime KV-cache decoder fp32 (prefill)",
    ("onnx-decoder", "ort-decoder-int8"): "onnxruntime KV-cache decoder int8 (prefill)",
    ("onnx-decoder", "ort-decoder-int4"): "onnxruntime KV-cache decoder int4 (prefill)",
    ("export", "openvino"): "OpenVINO (CPU's default precision)",
    ("export", "openvino", "ov-int8"): "OpenVINO int8 (tfaccel ov-int8)",
}

# The steps that make each artifact kind from a Keras model: a step consuming that kind runs after them.
PREREQUISITES: dict[str, tuple[str, ...]] = {"keras": (), "saved_model": ("export",), "onnx": ("export", "onnx"),
                                             "onnx_decoder": ("onnx-decoder",), "openvino": ("export", "openvino")}

RUNTIMES = {"keras": "keras", "saved_model": "tensorflow", "onnx": "onnxruntime", "tensorrt": "tensorrt",
            "tflite": "litert", "onnx_decoder": "onnxruntime", "tensorrt_decoder": "tensorrt", "openvino": "openvino"}

# Steps whose math is not float32, by name; other steps are judged by their name, policy and tolerance.
REDUCED_PRECISION = {"ort-int8": "int8", "ov-int8": "int8", "mixed_float16": "float16", "mixed_bfloat16": "bfloat16",
                     "ort-decoder-int8": "int8", "ort-decoder-int4": "int4", "tensorrt-decoder": "float16"}
_REDUCED_WORDS = ("int8", "int4", "float16", "fp16", "bf16", "fp8", "quant", "prun", "sparse")


class NotApplicable(Exception):
    """The row's steps do not apply to this workload or machine (the reason is the message)."""


def _is_causal_lm(source) -> str | None:
    if source.task != "causal_lm" or not hasattr(source.model, "call_with_cache"):
        return f"needs a keras-hub causal LM; {source.name} is a {source.task} model"
    return None


def _has_gpu(source) -> str | None:
    from tfaccel.compat import capabilities

    return None if capabilities().gpus else "needs an NVIDIA GPU; TensorFlow sees none on this machine"


# Applicability rules the harness knows for steps that have no ``check(source)`` method of their own.
APPLIES: dict[str, Callable[[Any], str | None]] = {
    "generate": _is_causal_lm,
    "tensorrt": _has_gpu,
    "tftrt": _has_gpu,
}


@dataclasses.dataclass
class Built:
    """What a row's builder returns: an artifact on disk and how to load it. Loading is separate so
    that every artifact is built (tf2onnx on BERT-base peaks at ~12 GB) before any is held in memory."""

    load: Callable[[], Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]  # () -> runner
    size_bytes: int
    kind: str  # "saved_model" | "onnx" | ...
    path: str | None = None
    build_seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)
    steps: tuple[str, ...] = ()  # the tfaccel steps actually run (after Pipeline.plan)


@dataclasses.dataclass
class BuildContext:
    """What a row builder sees: the source, a scratch folder, a logger and a per-workload cache
    (chains of steps share their common prefixes: the onnx row reuses the export row's SavedModel)."""

    source: Any  # tfaccel.ModelSource
    work_dir: Path
    log: Callable[[str], None]
    shapes: Sequence[tuple[int, int]] = ((1, 16),)  # checked by Pipeline.plan (e.g. against max length)
    step_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    cache: dict[Any, Any] = dataclasses.field(default_factory=dict)  # what rows build once per workload (the --auto run)
    _builder: Any = None

    def make_step(self, name: str):
        return make_step(name, self.step_options)

    @property
    def builder(self):
        """The workload's :class:`tfaccel.core.chain.ChainBuilder`: chains share their built prefixes."""
        if self._builder is None:
            from tfaccel.core.chain import ChainBuilder

            self._builder = ChainBuilder(self.source, self.work_dir / "chains", self.log)
        return self._builder

    def drop_keras_artifacts(self, keep: Sequence[Sequence[str]] = ()) -> None:
        """Forget in-memory Keras models made by steps (runners keep what they loaded), except those
        of chains that a later row starts with (``keep``: the later rows' step chains)."""
        from tfaccel.core.chain import step_key

        needed = set()
        for chain in keep:
            keys = [step_key(self.make_step(n)) for n in chain if n in _step_names()]
            needed |= {tuple(keys[:i]) for i in range(1, len(keys) + 1)}
        self.builder.forget_keras(needed)


@dataclasses.dataclass
class RowSpec:
    name: str
    group: str  # "baseline" | "tfaccel" | "peer"
    steps: tuple[str, ...]
    build: Callable[[BuildContext], Built]
    runtime: str = "tensorflow"
    # "fp32" when every step keeps float32 math, else e.g. "int8", "float16" (see _precision).
    precision: str = "fp32"


# --------------------------------------------------------------------------------------------------
# The baseline: plain Keras export


class _RenamedOutputs:
    """A runner whose outputs are renamed to the Keras model's output names."""

    def __init__(self, runner, reference_names: list[str] | None):
        self.runner = runner
        self.reference_names = reference_names
        self.mapping: dict[str, str] | None = None

    def __call__(self, inputs):
        out = self.runner(inputs)
        if self.mapping is None:
            self.mapping = output_name_mapping(list(out), self.reference_names)
        return {self.mapping.get(k, k): v for k, v in out.items()}


def output_name_mapping(got: list[str], reference: list[str] | None) -> dict[str, str]:
    """How a ``model.export`` signature's outputs map to the Keras model's: dict outputs keep their
    keys; a single output is called ``output_0`` (and ``output_<i>`` for lists)."""
    if not reference or set(got) == set(reference):
        return {}
    if len(got) == 1 and len(reference) == 1:
        return {got[0]: reference[0]}
    if all(f"output_{i}" in got for i in range(len(reference))):
        return {f"output_{i}": name for i, name in enumerate(reference)}
    return {}


def build_keras_export(ctx: BuildContext) -> Built:
    """``model.export(path, format="tf_saved_model")``, served through ``serving_default``."""
    from tfaccel.core.artifact import SavedModelRunner, output_names_of
    from tfaccel.core.files import dir_size

    path = ctx.work_dir / "keras-model-export"
    ctx.log("  model.export(path, format='tf_saved_model')")
    t0 = time.perf_counter()
    ctx.source.model.export(str(path), format="tf_saved_model", verbose=False)
    seconds = time.perf_counter() - t0
    names = output_names_of(ctx.source.model)
    return Built(load=lambda: _RenamedOutputs(SavedModelRunner(str(path)), names), size_bytes=dir_size(path),
                 kind="saved_model", path=str(path), build_seconds=seconds)


def keras_export_row() -> RowSpec:
    return RowSpec(name="model.export", group="baseline", steps=(), build=build_keras_export)


# --------------------------------------------------------------------------------------------------
# tfaccel rows: chains of pipeline steps


def make_step(name: str, options: dict[str, dict[str, Any]] | None = None):
    from tfaccel import get_step

    opts = dict(STEP_OPTIONS.get(name, {}))
    opts.update((options or {}).get(name, {}))
    return get_step(name, **opts)


def planned_chain(names: Sequence[str], ctx: BuildContext) -> tuple[str, ...]:
    """The steps tfaccel would run for ``names`` (Pipeline.plan appends an export when the last step
    leaves a Keras model). Raises PlanError for impossible chains or shapes."""
    from tfaccel import Pipeline

    steps = [ctx.make_step(n) for n in names]
    pipeline = Pipeline(steps, shapes=ctx.shapes, measure=False, log=lambda _m: None)
    return tuple(s.name for s in pipeline.plan(ctx.source))


def not_applicable_reason(chain: Sequence[str], ctx: BuildContext) -> str | None:
    """Why a chain does not apply to this source or machine, or None: a step's own ``check(source)``
    (if it has one) raising a tfaccel error, or a rule in APPLIES."""
    from tfaccel.errors import TfaccelError

    for name in chain:
        rule = APPLIES.get(name)
        reason = rule(ctx.source) if rule else None
        if reason:
            return f"'{name}' {reason}"
        check = getattr(ctx.make_step(name), "check", None)
        if callable(check):
            try:
                check(ctx.source)
            except TfaccelError as exc:
                return f"'{name}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


def default_chains() -> list[tuple[str, ...]]:
    """One chain per available step: the steps that make its input, then the step itself."""
    from tfaccel import available_steps

    chains = []
    for name in available_steps():
        step = make_step(name)
        pre = tuple(p for p in PREREQUISITES.get(step.consumes, ()) if p != name)
        chain = pre + (name,)
        if chain not in chains:
            chains.append(chain)
    return chains


def _step_names() -> set[str]:
    from tfaccel import available_steps

    return set(available_steps())


def build_chain(chain: tuple[str, ...], ctx: BuildContext, options: dict[str, dict[str, Any]] | None = None):
    """The artifact after running ``chain``'s steps (the workload's chain builder reuses any prefix already
    built; a prefix that failed fails again at once, naming its step). ``options`` are a row's own step options
    (step name -> options, over the workload's). Returns (artifact, seconds of every step of the chain); the
    steps' notes are in ``artifact.info["notes"]``."""
    if options:
        merged = {**ctx.step_options, **{k: {**ctx.step_options.get(k, {}), **v} for k, v in options.items()}}
        label = "+".join(f"{n}({','.join(f'{k}={v}' for k, v in sorted(options[n].items()))})" if n in options
                         else n for n in chain)
        steps = [make_step(n, merged) for n in chain]
    else:
        label, steps = "+".join(chain) or "reference", [ctx.make_step(n) for n in chain]
    built = ctx.builder.build(label, steps)
    built.artifact.info = dict(built.artifact.info, notes=list(built.notes))
    return built.artifact, built.seconds


def tfaccel_row(chain: Sequence[str], name: str | None = None, options: dict[str, dict[str, Any]] | None = None,
                requires: Callable[[], str | None] | None = None) -> RowSpec:
    """A row that runs tfaccel pipeline steps in order and serves the last artifact.

    ``options`` are this row's step options (step name -> options, over the workload's), e.g.
    ``{"export": {"products": "keras"}}``; ``requires()`` says why the row does not apply here (None: it does),
    read from :func:`tfaccel.compat.capabilities` for a comparison that only means something on some hardware.
    """
    chain = tuple(chain)

    def build(ctx: BuildContext) -> Built:
        reason = not_applicable_reason(chain, ctx) or (requires() if requires else None)
        if reason:
            raise NotApplicable(reason)
        steps = planned_chain(chain, ctx)
        if steps[len(chain):] == ("export",) and _produced_kind(chain) in ("onnx_decoder", "tensorrt_decoder"):
            steps = chain  # a decoder row serves its decoder, not the SavedModel plan() appends for the run
        artifact, total = build_chain(steps, ctx, options)
        return Built(load=artifact.runner, size_bytes=artifact.size_bytes(), kind=artifact.kind,
                     path=artifact.path, build_seconds=total, notes=list(artifact.info.get("notes", [])),
                     steps=steps)

    kind = _produced_kind(chain)
    runtime = RUNTIMES.get(kind, kind)
    group = "tfaccel" if runtime in ("tensorflow", "keras") else "peer"
    label = name or ROW_LABELS.get(chain) or "tfaccel " + " + ".join(chain)
    return RowSpec(name=label, group=group, steps=chain, build=build, runtime=runtime, precision=_precision(chain))


def _precision(chain: tuple[str, ...]) -> str:
    """"fp32" if every step keeps float32 math, else what the chain reduces to (e.g. "int8")."""
    for name in chain:
        if name in REDUCED_PRECISION:
            return REDUCED_PRECISION[name]
        step = make_step(name)
        if "inference_precision" in step.params():  # openvino: the precision the CPU plugin computes in here
            precision = step.params()["inference_precision"]
            if precision != "f32":
                return precision
            continue
        policy = getattr(step, "policy", None)
        if isinstance(policy, str) and policy != "float32":
            return policy
        limit = step.default_tolerance.max_abs_diff
        if any(w in name.lower() for w in _REDUCED_WORDS) or limit is None or limit > 1e-3:
            return "reduced"
    return "fp32"


def _produced_kind(chain: tuple[str, ...]) -> str:
    """The kind of artifact a chain serves (a chain ending on a Keras model gets an export)."""
    kind = "keras"
    for name in chain:
        kind = make_step(name).produces
    return "saved_model" if kind == "keras" else kind


def _native_bf16() -> str | None:
    from tfaccel.compat import capabilities

    native, why = capabilities().half_precision("mixed_bfloat16")
    return None if native else f"compares two bf16 forms where bf16 is native; here {why}"


#: The ``mixed_bfloat16`` row's export writes 2-D products (export ``products="auto"``); this row keeps Keras'
#: einsums, so a bf16 CPU measures what that default buys (RESULTS.md: 1.71x against 1.38x at 32x128 on a Zen 4).
BF16_EINSUM_ROW = "tfaccel mixed_bfloat16 with Keras' einsums (export products=keras)"


def default_rows(extra_chains: Sequence[Sequence[str]] = ()) -> list[RowSpec]:
    rows = [keras_export_row()]
    chains = default_chains()
    chains += [tuple(c) for c in extra_chains if tuple(c) not in chains]
    rows += [tfaccel_row(c) for c in chains]
    if ("mixed_bfloat16",) in chains:
        rows.append(tfaccel_row(("mixed_bfloat16",), BF16_EINSUM_ROW, {"export": {"products": "keras"}},
                                requires=_native_bf16))
    return rows


# --------------------------------------------------------------------------------------------------
# The --auto row: what `tfaccel optimize MODEL --auto` chooses on this machine


def _run_auto(ctx: BuildContext, formats: str) -> tuple[dict[str, Any], Path, float]:
    """``tfaccel optimize SOURCE --auto --formats FORMATS`` at every shape of the workload, in a child process
    (its candidates' memory is gone before the other rows load), once per workload and formats: returns its
    report, its output folder and its wall time."""
    import json
    import sys

    from tfaccel.core.processes import run_child

    key = ("auto-run", formats)
    if key not in ctx.cache:
        out = ctx.work_dir / f"auto-out-{formats}"
        exe = Path(sys.executable).parent / "tfaccel"
        cmd = [str(exe), "optimize", ctx.source.name, "--auto", "--formats", formats, "--out", str(out), "--overwrite"]
        for batch, seq in ctx.shapes:
            cmd += ["--shape", f"{batch}x{seq}"]
        ctx.log("  " + " ".join(cmd[1:]))
        t0 = time.perf_counter()
        proc = run_child(cmd, capture_output=True, text=True)  # dies with the benchmark
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"tfaccel optimize --auto exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
        ctx.cache[key] = (json.loads((out / "report.json").read_text()), out, wall)
    return ctx.cache[key]


def build_auto(ctx: BuildContext, formats: str = "savedmodel", serve: str = "savedmodel") -> Built:
    """Serve what ``--auto --formats FORMATS`` kept (:func:`_run_auto`): its SavedModel (``serve="savedmodel"``)
    or the fastest artifact of any format (``serve="fastest"``). The row's build time is the wall time of the
    whole CLI run, model loading included."""
    from tfaccel.core.artifact import Artifact
    from tfaccel.core.files import dir_size

    report, out, wall = _run_auto(ctx, formats)
    cands = {c["name"]: c for c in report["candidates"]}
    name = report["winner"] if serve == "savedmodel" else report["fastest_artifact"]
    win = cands[name]
    path = out / (report["final_saved_model"] if serve == "savedmodel" else report["fastest_artifact_path"])
    size = dir_size(path)
    baseline = ctx.work_dir / "keras-model-export"  # the model.export row, built before this one
    size_note = f", size {size / dir_size(baseline):.2f}x model.export's" if baseline.exists() else ""
    timed = sum(1 for c in cands.values() if c["status"] in ("kept", "dropped"))
    what = "SavedModel" if serve == "savedmodel" else "artifact of any format"
    notes = [f"--auto --formats {formats}: its fastest {what} is {name} ({' -> '.join(win['steps'])}, {win['kind']}) of "
             f"{timed} timed candidates within its budget ({report['budget_rule']}); the auto run measured it at "
             + ", ".join(f"{v:.2f}x at {k}" for k, v in win["speedups"].items())
             + f" vs its baseline{size_note}; wall time of the auto run {wall:.0f}s"
             + f" (time budget {report.get('time_budget_s')}s)"
             + "".join(f"; not tried: {c['name']} ({c['reason'].split(':')[0]})" for c in cands.values()
                       if c["status"] == "not tried")]
    ctx.log(f"  {notes[0]}")
    artifact = Artifact(kind=win["kind"], path=str(path))
    return Built(load=artifact.runner, size_bytes=size, kind=win["kind"], path=str(path),
                 build_seconds=wall, notes=notes, steps=tuple(win["steps"]))


def auto_row(formats: str = "savedmodel", serve: str = "savedmodel") -> RowSpec:
    name = "tfaccel --auto" + (f" --formats {formats}" if formats != "savedmodel" else "")
    name += " (fastest of any format)" if serve == "fastest" else (" (its SavedModel)" if formats != "savedmodel" else "")
    return RowSpec(name=name, group="tfaccel", steps=("--auto",), build=lambda ctx: build_auto(ctx, formats, serve),
                   precision="auto")


def auto_rows() -> list[RowSpec]:
    """One ``--auto --formats all`` run, two rows: the SavedModel it keeps and the fastest artifact of any format."""
    return [auto_row("all", "savedmodel"), auto_row("all", "fastest")]


# --------------------------------------------------------------------------------------------------
# OpenVINO: tfaccel's steps at an explicit precision, and what a user gets by hand


def openvino_precision_row(precision: str) -> RowSpec:
    """tfaccel's export -> openvino (-> ov-int8) with ``inference_precision`` set, e.g. f32 on a bf16 CPU."""
    def build(ctx: BuildContext) -> Built:
        from tfaccel import get_step

        reason = not_applicable_reason(("export", "openvino"), ctx)
        if reason:
            raise NotApplicable(reason)
        try:
            get_step("openvino", inference_precision=precision).check(ctx.source)
        except Exception as exc:
            raise NotApplicable(f"'openvino' at {precision}: {str(exc).splitlines()[0]}") from exc
        key = ("openvino-precision", precision)
        if key not in ctx.cache:
            from tfaccel import StepContext

            export, _ = build_chain(("export",), ctx)
            stage = ctx.work_dir / f"openvino-{precision}"
            stage.mkdir(parents=True, exist_ok=True)
            notes: list[str] = []
            t0 = time.perf_counter()
            art = get_step("openvino", inference_precision=precision).apply(
                export, StepContext(source=ctx.source, stage_dir=stage, log=ctx.log, notes=notes))
            ctx.cache[key] = (art, time.perf_counter() - t0, notes)
        art, seconds, notes = ctx.cache[key]
        return Built(load=art.runner, size_bytes=art.size_bytes(), kind="openvino", path=art.path,
                     build_seconds=seconds, notes=list(notes), steps=("export", f"openvino(inference_precision={precision})"))

    return RowSpec(name=f"OpenVINO {precision} (tfaccel openvino)", group="peer", steps=("export", "openvino"),
                   build=build, runtime="openvino", precision=precision)


class _PlainOpenVINO:
    """What a user runs by hand: ``core.compile_model(xml, "CPU")`` with OpenVINO's defaults, one infer request."""

    def __init__(self, xml: str):
        import openvino as ov

        self.compiled = ov.Core().compile_model(xml, "CPU")
        self.request = self.compiled.create_infer_request()

    def __call__(self, inputs):
        res = self.request.infer(inputs)
        return {o.get_any_name(): np.array(res[o]) for o in self.compiled.outputs}

    def stats(self):
        c = self.compiled
        return {"inference_precision": c.get_property("INFERENCE_PRECISION_HINT").to_string(),
                "performance_hint": str(c.get_property("PERFORMANCE_HINT")),
                "threads": int(c.get_property("INFERENCE_NUM_THREADS"))}


def plain_openvino_row(int8: bool, samples: int = 64) -> RowSpec:
    """The peer a user gets without tfaccel: ``openvino.convert_model`` on ``model.export``'s SavedModel, and for
    int8 ``nncf.quantize(model, nncf.Dataset(<samples> examples), model_type=ModelType.TRANSFORMER)`` on the
    first examples of the eval split (else the sample inputs), compiled with OpenVINO's defaults."""
    def build(ctx: BuildContext) -> Built:
        from tfaccel.compat import package_version

        if not package_version("openvino") or (int8 and not package_version("nncf")):
            raise NotApplicable("needs the openvino extra (openvino, nncf)")
        import openvino as ov

        from tfaccel.core.files import dir_size

        sm = ctx.work_dir / "plain-openvino-export"
        t0 = time.perf_counter()
        if not sm.exists():
            ctx.source.model.export(str(sm), format="tf_saved_model", verbose=False)
        model = ov.convert_model(str(sm))
        notes = ["openvino.convert_model(model.export's SavedModel), compiled with OpenVINO's CPU defaults"]
        if int8:
            import nncf

            data = ctx.source.eval_inputs if ctx.source.eval_inputs is not None else ctx.source.sample_inputs
            n = min(samples, len(next(iter(data.values()))))
            items = [{k: v[i: i + 1] for k, v in data.items()} for i in range(n)]
            model = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=n)
            notes.append(f"nncf.quantize(ModelType.TRANSFORMER) on {n} examples")
        xml = ctx.work_dir / f"plain-openvino-{'int8' if int8 else 'fp'}" / "model.xml"
        ov.save_model(model, str(xml))
        seconds = time.perf_counter() - t0
        from tfaccel.core.artifact import output_names_of

        names = output_names_of(ctx.source.model)  # model.export calls a single output "output_0"
        return Built(load=lambda: _RenamedOutputs(_PlainOpenVINO(str(xml)), names), size_bytes=dir_size(xml.parent),
                     kind="openvino",
                     path=str(xml.parent), build_seconds=seconds, notes=notes)

    name = f"plain OpenVINO {'int8 (nncf.quantize on 64 samples)' if int8 else '(convert_model)'} by hand"
    return RowSpec(name=name, group="peer", steps=(), build=build, runtime="openvino",
                   precision="int8" if int8 else "default")


def openvino_rows() -> list[RowSpec]:
    """The peers the OpenVINO targets are ratios against, and tfaccel's OpenVINO at f32 (the default is bf16
    where the CPU has it, f32 elsewhere)."""
    return [plain_openvino_row(False), plain_openvino_row(True), openvino_precision_row("f32")]


# --------------------------------------------------------------------------------------------------
# Generation rows (causal LMs)


@dataclasses.dataclass
class GenerationSpec:
    prompt_tokens: int
    new_tokens: int
    batch: int = 1
    sampler: str = "greedy"


@dataclasses.dataclass
class Generator:
    """One prepared way to generate: ``run()`` does a whole generation; ``new_token_ids(result)`` gives
    the generated ids, shape (batch, new_tokens), so rows can be checked against each other. ``artifact`` (a
    generation artifact's path) and ``scorer`` (what :func:`tfaccel.generation.quality.quality_measures` takes)
    let the bench measure its quality and its memory in a fresh process."""

    run: Callable[[], Any]
    new_token_ids: Callable[[Any], np.ndarray]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    artifact: str | None = None
    scorer: Any = None


@dataclasses.dataclass
class GenerationRow:
    name: str
    group: str
    prepare: Callable[[BuildContext, GenerationSpec, dict[str, np.ndarray]], Generator]
    steps: tuple[str, ...] = ()


def keras_hub_generate(ctx: BuildContext, spec: GenerationSpec, prompt: dict[str, np.ndarray]) -> Generator:
    """keras-hub's own ``CausalLM.generate`` with a greedy sampler (XLA as keras-hub decides)."""
    model = ctx.source.model
    model.compile(sampler=spec.sampler)
    p = spec.prompt_tokens
    # With preprocessor=None the inputs are padded to the full length and max_length is ignored.
    inputs = {"token_ids": np.pad(prompt["token_ids"], [[0, 0], [0, spec.new_tokens]]),
              "padding_mask": np.pad(prompt["padding_mask"], [[0, 0], [0, spec.new_tokens]]).astype(bool)}

    def run():
        return model.generate(dict(inputs), max_length=p + spec.new_tokens, stop_token_ids=None)

    def new_ids(out):
        mask = np.asarray(out["padding_mask"])
        if int(mask.sum()) != spec.batch * (p + spec.new_tokens):
            raise AssertionError(f"keras-hub generate marked {int(mask.sum()) - spec.batch * p} new tokens, "
                                 f"expected {spec.batch * spec.new_tokens}")
        return np.asarray(out["token_ids"])[:, p:]

    return Generator(run=run, new_token_ids=new_ids, info={"jit_compile": getattr(model, "jit_compile", None)},
                     scorer=model)


def signature_generate(signature: str = "generate_greedy", chain: tuple[str, ...] = ("generate",)):
    """Generation through a SavedModel signature (token_ids, padding_mask, max_new_tokens, stop_token_id)
    of the artifact that the tfaccel steps ``chain`` make, e.g. ``generate``."""

    def prepare(ctx: BuildContext, spec: GenerationSpec, prompt: dict[str, np.ndarray]) -> Generator:
        import tensorflow as tf

        reason = not_applicable_reason(chain, ctx)
        if reason:
            raise NotApplicable(reason)
        artifact, _ = build_chain(planned_chain(chain, ctx), ctx)
        fn = tf.saved_model.load(str(artifact.path)).signatures[signature]
        args = {"token_ids": tf.constant(prompt["token_ids"], tf.int32),
                "padding_mask": tf.constant(prompt["padding_mask"], tf.int32),
                "max_new_tokens": tf.constant(spec.new_tokens, tf.int32), "stop_token_id": tf.constant(-1, tf.int32)}

        def run():
            return fn(**args)

        def new_ids(out):
            lengths = out["lengths"].numpy()
            if not np.all(lengths == spec.prompt_tokens + spec.new_tokens):
                raise AssertionError(f"{signature} returned lengths {lengths.tolist()}, expected "
                                     f"{spec.prompt_tokens + spec.new_tokens}")
            return out["token_ids"].numpy()[:, spec.prompt_tokens: spec.prompt_tokens + spec.new_tokens]

        return Generator(run=run, new_token_ids=new_ids, info={"signature": signature, "xla": True})

    return prepare


def runner_generate(chain: tuple[str, ...], options: dict[str, dict[str, Any]] | None = None, **generator_options):
    """Greedy generation through ``tfaccel.generation`` (what ``tfaccel generate`` runs) on the artifact
    the tfaccel steps ``chain`` make: the generate SavedModel, an ONNX decoder or a TensorRT decoder.
    ``options`` are this row's step options (step name -> options, over the workload's);
    ``generator_options`` go to the generator (e.g. ``intra_op_threads=1`` for an ONNX decoder)."""

    def prepare(ctx: BuildContext, spec: GenerationSpec, prompt: dict[str, np.ndarray]) -> Generator:
        from tfaccel.core.files import dir_size
        from tfaccel.generation import load_generator

        reason = not_applicable_reason(chain, ctx)
        if reason:
            raise NotApplicable(reason)
        artifact, _ = build_chain(tuple(chain), ctx, options)
        gen = load_generator(artifact.path, **generator_options)
        ids = prompt["token_ids"].astype(np.int32)
        mask = prompt["padding_mask"].astype(np.int32)
        p = spec.prompt_tokens

        def run():
            return gen.generate(ids, spec.new_tokens, -1, padding_mask=mask)

        def new_ids(res):
            if not np.all(res.lengths == p + spec.new_tokens):
                raise AssertionError(f"{gen.kind} returned lengths {res.lengths.tolist()}, expected {p + spec.new_tokens}")
            return res.token_ids[:, p: p + spec.new_tokens]

        info = {"artifact": gen.kind, "size_mb": round(dir_size(artifact.path) / 2**20, 1),
                **getattr(gen, "threading", {})}
        info.update({k: v for k, v in getattr(gen, "info", {}).items()
                     if k in ("quantization", "method", "block_size", "head_bits", "graph", "per_channel",
                              "reduce_range", "matmuls_quantized", "already_quantized", "tied_embedding")})
        return Generator(run=run, new_token_ids=new_ids, info=info, artifact=str(artifact.path), scorer=gen)

    return prepare


def default_generation_rows() -> list[GenerationRow]:
    d, i8, i4 = "onnx-decoder", "ort-decoder-int8", "ort-decoder-int4"
    return [
        GenerationRow(name="keras-hub generate (greedy)", group="baseline", prepare=keras_hub_generate),
        GenerationRow(name="tfaccel generate: generate_greedy signature", group="tfaccel",
                      prepare=runner_generate(("generate",)), steps=("generate",)),
        GenerationRow(name="tfaccel onnx-decoder: onnxruntime fp32, KV cache", group="tfaccel",
                      prepare=runner_generate((d,)), steps=(d,)),
        GenerationRow(name="tfaccel ort-decoder-int8: 8-bit weight blocks of 64 (MatMulNBits)", group="tfaccel",
                      prepare=runner_generate((d, i8)), steps=(d, i8)),
        GenerationRow(name="tfaccel ort-decoder-int8 method=dynamic (MatMulInteger)", group="tfaccel",
                      prepare=runner_generate((d, i8), {i8: {"method": "dynamic"}}), steps=(d, i8)),
        GenerationRow(name="tfaccel ort-decoder-int4: 4-bit blocks of 32, 8-bit LM head", group="tfaccel",
                      prepare=runner_generate((d, i4)), steps=(d, i4)),
        GenerationRow(name="tfaccel ort-decoder-int4 head_bits=4: every weight 4-bit", group="tfaccel",
                      prepare=runner_generate((d, i4), {i4: {"head_bits": 4}}), steps=(d, i4)),
        # GPTQ / AWQ calibrate on text: rows are n/a on a source without any (random-weight examples)
        GenerationRow(name="tfaccel gptq + ort-decoder-int8: Keras GPTQ 4-bit, 8-bit LM head", group="tfaccel",
                      prepare=runner_generate(("gptq", d, i8), {i8: {"block_size": 32}}), steps=("gptq", d, i8)),
        GenerationRow(name="tfaccel awq + ort-decoder-int8: Keras AWQ 4-bit, 8-bit LM head", group="tfaccel",
                      prepare=runner_generate(("awq", d, i8), {i8: {"block_size": 32}}), steps=("awq", d, i8)),
        GenerationRow(name="tfaccel tensorrt-decoder: TensorRT fp16, KV cache", group="tfaccel",
                      prepare=runner_generate((d, "tensorrt-decoder"), {d: {"graph": "keras-layers"}}),
                      steps=(d, "tensorrt-decoder")),
    ]


def llama_generation_rows() -> list[GenerationRow]:
    """The native Llama decoder graph against the one traced through keras-hub's layers."""
    d = "onnx-decoder"
    return [
        GenerationRow(name="keras-hub generate (greedy)", group="baseline", prepare=keras_hub_generate),
        GenerationRow(name="tfaccel onnx-decoder: native graph, fp32", group="tfaccel",
                      prepare=runner_generate((d,)), steps=(d,)),
        GenerationRow(name="tfaccel onnx-decoder graph=keras-layers: traced through keras-hub, fp32", group="tfaccel",
                      prepare=runner_generate((d,), {d: {"graph": "keras-layers"}}), steps=(d,)),
        GenerationRow(name="tfaccel ort-decoder-int8 on the native graph", group="tfaccel",
                      prepare=runner_generate((d, "ort-decoder-int8")), steps=(d, "ort-decoder-int8")),
    ]


def generation_prompt(vocab_size: int, spec: GenerationSpec, seed: int = 0,
                      texts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Prompt token ids (batch, prompt_tokens) and an all-ones padding mask: the first tokens of ``texts``
    (rows of real token ids, e.g. held-out articles) when given, else random ids."""
    if texts is not None:
        texts = np.asarray(texts)
        if texts.shape[0] < spec.batch or texts.shape[1] < spec.prompt_tokens:
            raise ValueError(f"{texts.shape[0]} real prompts of {texts.shape[1]} tokens cannot make a batch of "
                             f"{spec.batch} x {spec.prompt_tokens}")
        ids = np.ascontiguousarray(texts[: spec.batch, : spec.prompt_tokens]).astype("int32")
    else:
        rng = np.random.default_rng(seed)
        ids = rng.integers(1, vocab_size, size=(spec.batch, spec.prompt_tokens)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids, dtype="int32")}


# --------------------------------------------------------------------------------------------------
# Workloads


@dataclasses.dataclass
class Workload:
    name: str
    source: str  # a tfaccel example name
    shapes: list[tuple[int, int]]
    rows: list[RowSpec] = dataclasses.field(default_factory=default_rows)
    accuracy: bool = False  # measure accuracy on the source's eval split for every row
    generation: GenerationSpec | None = None
    more_generation: list[GenerationSpec] = dataclasses.field(default_factory=list)  # e.g. the same at batch 8
    generation_rows: list[GenerationRow] = dataclasses.field(default_factory=default_generation_rows)
    step_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # Quick mode: make an eval split from synthetic inputs labelled by the Keras model itself.
    synthetic_eval: int = 0
    # Generation prompts: the source's sample token ids (real text) instead of random ids.
    real_prompts: bool = False
    note: str = ""


QUICK_GPT_SERVING_ROWS = ("model.export", "tfaccel export", "onnxruntime fp32", "onnxruntime dynamic int8")


def workloads(quick: bool = False) -> dict[str, Workload]:
    if quick:
        return {
            "bert-base": Workload("bert-base", "bert-tiny", [(1, 32), (8, 32)],
                                  note="quick mode: bert-tiny stands in for bert-base"),
            "minilm-bbc": Workload("minilm-bbc", "bert-tiny", [(1, 32)], accuracy=True, synthetic_eval=48,
                                   rows=default_rows(COMBINATIONS),
                                   note="quick mode: bert-tiny stands in for minilm-bbc; its eval labels are "
                                        "the Keras model's own predictions on synthetic inputs"),
            # Generation rows, and of the serving rows only the baseline and the fp32 / int8 ONNX peers: the
            # other serving rows run on minilm-bbc's stand-in above (a minute less in the suite's quick run).
            "gpt2-small": Workload("gpt2-small", "gpt2-tiny", [(1, 32)], generation=GenerationSpec(8, 8),
                                   more_generation=[GenerationSpec(8, 8, batch=4)],
                                   rows=[r for r in default_rows() if r.name in QUICK_GPT_SERVING_ROWS],
                                   step_options={"generate": {"max_new_tokens_cap": 16, "prompt_buckets": (32,)}},
                                   note="quick mode: gpt2-tiny stands in for gpt2-small; serving rows: "
                                        + ", ".join(QUICK_GPT_SERVING_ROWS)),
        }
    return {
        "bert-base": Workload("bert-base", "bert-base", [(1, 128), (32, 128)],
                              rows=default_rows(COMBINATIONS) + openvino_rows() + auto_rows(),
                              note="BERT-base architecture (12 layers, hidden 768), random weights"),
        "minilm-bbc": Workload("minilm-bbc", "minilm-bbc", [(1, 128), (32, 128)], accuracy=True,
                               rows=default_rows() + openvino_rows() + auto_rows(),
                               note="all-MiniLM-L6-v2 fine-tuned on BBC News; accuracy on 200 held-out articles"),
        "gpt2-small": Workload("gpt2-small", "gpt2-small", [(1, 128)], generation=GenerationSpec(32, 64),
                               more_generation=[GenerationSpec(32, 64, batch=8)],
                               note="GPT-2 small architecture (124M), random weights"),
        # Quality of the quantized decoders on a model whose next-token choices are not near ties.
        "gpt2-bbc": Workload("gpt2-bbc", "gpt2-bbc", [(1, 128)], generation=GenerationSpec(32, 64),
                             more_generation=[GenerationSpec(32, 64, batch=8)], real_prompts=True,
                             note="GPT-2 (4 layers, hidden 256) trained here on BBC News; prompts are the first 32 "
                                  "tokens of held-out articles; perplexity ratio, KL and same top token on 32 "
                                  "held-out windows (32 x 127 next tokens)"),
        "llama-small": Workload("llama-small", "llama-small", [(1, 128)], generation=GenerationSpec(32, 64),
                                rows=[], generation_rows=llama_generation_rows(),
                                note="Llama architecture of gpt2-small's size (12 layers, hidden 768, 4 KV heads), "
                                     "random weights: the native decoder graph against the traced one"),
    }
