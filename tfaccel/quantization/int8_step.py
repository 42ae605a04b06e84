"""Pipeline steps ``int8`` and ``int4``: Keras 3's own weight quantization on the layers the user
selects, written as a SavedModel whose int8 products run in the fastest form found on this stack.

Why the steps produce a SavedModel (consume "keras", produce "saved_model") instead of a Keras
model: the speed of int8 in TensorFlow is decided when the serving function is traced (which op
computes each int8 product, and whether XLA compiles it; see :mod:`int8_kernels`). A Keras int8
model handed to the pipeline's plain ``export`` runs Keras' own int8 calls without XLA, 2-3x slower
than float32. So the step writes the SavedModel itself, with ``write_saved_model`` (the
ExportArchive pattern that keeps XLA after a reload and loads in ``saved_model_cli``).

Speed on this project's machine (2-core AMD EPYC Zen 5, AVX-512 with VNNI) is in
benchmarks/RESULTS.md (rows ``tfaccel int8`` / ``tfaccel int4`` beside ``model.export``);
``python benchmarks/quantization_bench.py`` compares the kernel forms with each other.

``kernel="auto"`` is the default: the forms this machine runs (``Capabilities.int8_kernel_forms``;
oneDNN's int8 op does not run on AVX2-only CPUs such as AMD Zen 3) are traced on the quantized model and
timed round-robin at the run's shapes, and the fastest is written; the report's ``kernel_choice`` holds
the timings. "xla" runs on any TensorFlow and was the fastest at batch 1 on AVX-512; "onednn" was the
throughput choice for large batches of large models. Where the two win at different shapes (XLA at the
small batches, oneDNN at the large ones), "auto" writes ``kernel="by-batch"``: one SavedModel holding both
serving functions over the same int8 weights, a ``tf.cond`` on the batch size choosing between them
(``xla_max_batch`` rows and fewer go to XLA).
"""

from __future__ import annotations

import json
from typing import Any

from tfaccel.core.artifact import Artifact, graph_function
from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.errors import PlanError, StepError
from tfaccel.quantization.int8_kernels import KERNELS, int8_kernels
from tfaccel.quantization.keras_quantize import quantize_model
from tfaccel.quantization.quantization_config import QuantizationConfig
from tfaccel.quantization.quantization_report import QuantizationSummary

#: "auto" (default): time the forms that run here at the run's shapes and keep the fastest.
#: "by-batch": XLA's form up to ``xla_max_batch`` rows, oneDNN's above, in one serving function.
BY_BATCH = "by-batch"
KERNEL_CHOICES = ("auto", *KERNELS, BY_BATCH)

# int8 weights and activations change logits by about 1%; what a user keeps is the prediction:
# at most 1 point of accuracy on the eval split, and outputs still pointing the same way.
INT8_TOLERANCE = Tolerance(max_abs_diff=None, min_cosine=0.98, max_accuracy_drop=0.01)
# int4 weights (16 levels per group of 128) move outputs more than int8 does.
INT4_TOLERANCE = Tolerance(max_abs_diff=None, min_cosine=0.95, max_accuracy_drop=0.01)


def check_onednn_int8() -> None:
    """Raise StepError if this TensorFlow cannot run oneDNN's int8 inner product on this CPU.

    The probe itself lives in :mod:`tfaccel.compat` (``Capabilities.onednn_int8``): TensorFlow 2.21's op
    fails on AVX2-only CPUs (AMD Zen 3) and in builds or processes without oneDNN.

    Example:
        >>> check_onednn_int8()  # doctest: +SKIP  (passes on AVX-512 x86-64 Linux TensorFlow wheels)
    """
    from tfaccel.compat import capabilities

    ok, why = capabilities().int8_kernel_forms()["onednn"]
    if not ok:
        raise StepError(f"kernel='onednn' cannot run here: {why}. oneDNN's int8 kernels exist in x86-64 Linux/Windows "
                        "TensorFlow builds with TF_ENABLE_ONEDNN_OPTS unset or 1, on CPUs with AVX-512. "
                        "Use kernel='xla' (runs anywhere) or kernel='auto'.")


def _time_kernel_forms(qmodel, forms: dict[str, bool], inputs_by_shape: dict[tuple[int, int], dict],
                       rounds: int = 5, max_seconds: float = 20.0, log=None) -> tuple[dict, dict]:
    """Trace ``qmodel``'s serving function once per int8 form, then time the forms interleaved
    (:func:`tfaccel.core.timer.interleave`; ``max_seconds`` is shared by every form and shape).

    Args:
        forms: form -> jit_compile.
        inputs_by_shape: (batch, seq) -> inputs.

    Returns:
        ({form: {"BxS": median ms}}, {form: why it was left out}).
    """
    import time

    import tensorflow as tf

    from tfaccel.core.timer import interleave
    from tfaccel.quantization.int8_kernels import int8_kernels
    from tfaccel.saved_model import keras_serving_fn

    fns, failed = {}, {}
    for form, jit in forms.items():
        try:
            with int8_kernels(qmodel, form):
                fn = keras_serving_fn(qmodel, jit_compile=jit)
                per_shape = {}
                for shape, x in inputs_by_shape.items():
                    args = {k: tf.constant(v) for k, v in x.items()}
                    cf = fn.get_concrete_function(args)  # traced inside the form's context: the form is baked in
                    t0 = time.perf_counter()
                    cf(args)  # XLA compiles here
                    if log:
                        log(f"    int8 kernel {form}: traced and first call at {shape[0]}x{shape[1]} in "
                            f"{time.perf_counter() - t0:.1f}s")
                    per_shape[shape] = (cf, args)
            fns[form] = per_shape
        except Exception as exc:  # a form the probe allowed but that fails on this model or CPU
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            failed[form] = f"failed on this model: {type(exc).__name__}: {first}"
    # One interleaved timing per shape: each form's already-traced function, called on the same inputs.
    per_form = max_seconds / max(1, len(fns) * len(inputs_by_shape))
    medians: dict[str, dict[str, float]] = {f: {} for f in fns}
    for shape in inputs_by_shape:
        calls = {form: (lambda cf=per_shape[shape][0], a=per_shape[shape][1]: cf(a)) for form, per_shape in fns.items()}
        timing = interleave(calls, runs=max(3, rounds), warmup=0, max_seconds=per_form, batch=shape[0], seq=shape[1])
        for form, err in timing.errors.items():
            failed[form] = f"failed on this model: {err}"
        for form, m in timing.measurements.items():
            medians[form][f"{shape[0]}x{shape[1]}"] = m.p50_ms
    medians = {f: m for f, m in medians.items() if f not in failed}
    return medians, failed


def choose_kernel(medians: dict[str, dict[str, float]]) -> str:
    """The form with the lowest mean latency relative to the fastest form at each shape."""
    shapes = next(iter(medians.values())).keys()
    best = {sh: min(m[sh] for m in medians.values()) for sh in shapes}
    return min(medians, key=lambda f: sum(medians[f][sh] / best[sh] for sh in shapes))


def by_batch_split(medians: dict[str, dict[str, float]]) -> int | None:
    """The largest batch at which "xla" is the fastest form, when "xla" wins every smaller batch and "onednn"
    every larger one (``medians``: form -> {"BxS": ms}); None when one form wins everywhere or the winners
    do not split by batch size.

    Example:
        >>> by_batch_split({"xla": {"1x128": 9.0, "32x128": 300.0}, "onednn": {"1x128": 12.0, "32x128": 200.0}})
        1
    """
    if "xla" not in medians or "onednn" not in medians:
        return None
    winners = sorted((int(sh.split("x")[0]), min(medians, key=lambda f: medians[f][sh])) for sh in medians["xla"])
    xla_batches = [b for b, w in winners if w == "xla"]
    onednn_batches = [b for b, w in winners if w == "onednn"]
    if not xla_batches or not onednn_batches or len(xla_batches) + len(onednn_batches) != len(winners):
        return None
    return max(xla_batches) if max(xla_batches) < min(onednn_batches) else None


def write_by_batch_saved_model(qmodel, folder, xla_max_batch: int) -> list[str]:
    """Write ``qmodel`` (Keras-quantized int8) as a SavedModel whose ``serving_default`` runs the "xla" form
    (XLA-compiled) for batches of at most ``xla_max_batch`` rows and the "onednn" form (no XLA) for larger
    ones. Both functions read the same int8 variables, stored once. Returns the rewritten layers' paths.

    Example:
        >>> write_by_batch_saved_model(qmodel, "out", xla_max_batch=1)  # doctest: +SKIP
    """
    import tensorflow as tf

    from tfaccel.saved_model import keras_serving_fn, write_keras_endpoints

    # Traced inside each form's context: the concrete functions keep their form (and XLA its _XlaMustCompile,
    # which TensorFlow honours for a compiled function called from an uncompiled one, also after a reload).
    with int8_kernels(qmodel, "xla") as rewritten:
        small = keras_serving_fn(qmodel, jit_compile=True).get_concrete_function()
    with int8_kernels(qmodel, "onednn"):
        large = keras_serving_fn(qmodel, jit_compile=False).get_concrete_function()
    signature = small.structured_input_signature[0][0]

    def serve(inputs):
        rows = tf.shape(tf.nest.flatten(inputs)[0])[0]
        return tf.cond(rows <= xla_max_batch, lambda: small(inputs), lambda: large(inputs))

    write_keras_endpoints(qmodel, folder, {"serving_default": graph_function(serve, input_signature=[signature])})
    return rewritten


class _KerasQuantizeStep(Step):
    consumes = "keras"
    produces = "saved_model"
    quantized_output = True  # conversions that need a float SavedModel (openvino) refuse it at plan time
    mode: str = "int8"

    def __init__(self, config: QuantizationConfig | dict | None = None, *, layer_types=None, include=None,
                 exclude=None, keep_head=None, jit_compile: bool = True, **kwargs):
        super().__init__(**{k: kwargs.pop(k) for k in ("tolerance", "on_breach") if k in kwargs})
        if isinstance(config, dict):
            config = QuantizationConfig.from_config(config)
        if config is None:
            config = QuantizationConfig(mode=self.mode)
        if not isinstance(config, QuantizationConfig):
            raise ValueError(f"config must be a QuantizationConfig or its dict. Received: config={config!r}")
        overrides = {k: v for k, v in dict(layer_types=layer_types, include=include, exclude=exclude,
                                           keep_head=keep_head).items() if v is not None}
        overrides.update(kwargs)  # weight_only, block_size (None is a value: one scale per channel)
        try:
            config = config.replace(mode=self.mode, **overrides)
        except TypeError as exc:
            raise ValueError(f"Unknown option for step '{self.name}': {exc}") from None
        self.config = config
        if not isinstance(jit_compile, bool):
            raise ValueError(f"jit_compile must be True or False. Received: jit_compile={jit_compile!r}")
        self.jit_compile = jit_compile
        self.summary: QuantizationSummary | None = None

    kernel: str = "keras"

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"quantization": self.config.get_config(), "kernel": self.kernel,
                             "jit_compile": self.jit_compile}
        if self.summary is not None:
            p["quantized_layers"] = [d.path for d in self.summary.quantized]
            p["left_in_float"] = {d.path: d.reason for d in self.summary.left}
            p["weight_bytes_before"] = self.summary.weight_bytes_before
            p["weight_bytes_after"] = self.summary.weight_bytes_after
        return p

    def _resolve_kernel(self, ctx: StepContext, qmodel) -> None:
        """Hook for subclasses: settle the kernel form for the quantized model before it is written."""

    def _write(self, qmodel, ctx: StepContext) -> None:
        """Write the quantized model's SavedModel into ``ctx.stage_dir``, products in ``self.kernel``'s form."""
        from tfaccel.saved_model import write_saved_model

        with int8_kernels(qmodel, self.kernel) as rewritten:
            ctx.log(f"  writing SavedModel (products: {self.kernel}, jit_compile={self.jit_compile}, "
                    f"{len(rewritten)} rewritten)")
            write_saved_model(qmodel, ctx.stage_dir, jit_compile=self.jit_compile)

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        ctx.log(f"  Keras {self.mode} quantization of the selected layers")
        qmodel, summary = quantize_model(artifact.model, self.config, copy=True)
        self._resolve_kernel(ctx, qmodel)
        summary.kernel = self.kernel
        self.summary = summary
        for line in summary.notes():
            ctx.note(line)
        self._write(qmodel, ctx)
        if self.jit_compile:
            ctx.note("the serving function is XLA-compiled: the first call at each new (batch, sequence) shape "
                     "compiles (seconds for BERT-base)")
        info = summary.to_dict()
        (ctx.stage_dir / "quantization.json").write_text(json.dumps(info, indent=2))
        return Artifact(kind="saved_model", path=str(ctx.stage_dir), input_names=artifact.input_names,
                        info={"quantization": info})


class Int8Step(_KerasQuantizeStep):
    """Keras model -> int8 SavedModel: Keras ``quantize("int8")`` on the selected layers, products in
    the chosen kernel form.

    Args:
        config: a :class:`QuantizationConfig` (mode is forced to "int8"), or its dict.
        kernel: how int8 products run (see :mod:`tfaccel.quantization.int8_kernels`): "auto" (default:
            time the forms that run on this machine at the run's shapes, keep the fastest), "xla" (int8
            dot in an XLA-compiled serving function; runs on any TensorFlow),
            "onednn" (oneDNN's u8s8 int8 inner product, no XLA: fastest for large batches of a large
            model, slower than "xla" on small models; the SavedModel needs a TensorFlow with oneDNN,
            i.e. x86-64 Linux/Windows wheels with TF_ENABLE_ONEDNN_OPTS not 0), "by-batch" ("xla" for
            batches of up to ``xla_max_batch`` rows, "onednn" above, in one SavedModel; "auto" picks it when
            the timed forms win at different batch sizes), or "keras" (Keras' own int8 calls, for
            comparison). An explicit form this machine cannot run is refused at plan time.
        jit_compile: XLA-compile the serving function. Default: False for "onednn" (XLA cannot
            compile oneDNN's quantized op), True otherwise; not an option for "auto" and "by-batch".
        xla_max_batch: with "by-batch", the largest batch that runs the XLA form (default 1).
        layer_types, include, exclude, keep_head, weight_only: shortcuts for the config fields.

    Example:
        >>> Pipeline([Int8Step(exclude=("pooled_dense",))]).run(load_source("minilm-bbc"), "out")  # doctest: +SKIP
        >>> Pipeline([Int8Step(kernel="onednn")], shapes=[(32, 128)]).run(load_source("bert-base"), "out")  # doctest: +SKIP
    """

    name = "int8"
    mode = "int8"
    default_tolerance = INT8_TOLERANCE

    def __init__(self, config=None, *, kernel: str = "auto", jit_compile: bool | None = None,
                 xla_max_batch: int | None = None, **kwargs):
        if kernel not in KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {KERNEL_CHOICES}. Received: kernel={kernel!r}")
        if xla_max_batch is not None and (kernel != BY_BATCH or isinstance(xla_max_batch, bool)
                                          or not isinstance(xla_max_batch, int) or xla_max_batch < 1):
            raise ValueError(f"xla_max_batch is an int >= 1 for kernel='by-batch'. Received: "
                             f"xla_max_batch={xla_max_batch!r} with kernel={kernel!r}")
        if kernel == BY_BATCH and jit_compile is not None:
            raise ValueError("kernel='by-batch' XLA-compiles its small-batch function only. Received: "
                             f"jit_compile={jit_compile!r}; leave it unset.")
        if kernel == "onednn" and jit_compile:
            raise ValueError("kernel='onednn' cannot be XLA-compiled (XLA has no kernel for oneDNN's quantized op). "
                             "Received: jit_compile=True; use kernel='xla' for an XLA-compiled int8 SavedModel.")
        if kernel == "auto" and jit_compile is not None:
            raise ValueError("With kernel='auto' each form gets its own jit_compile (xla and keras: True, onednn: "
                             f"False). Received: jit_compile={jit_compile!r}; pass kernel='xla' or 'keras' to set it.")
        super().__init__(config, jit_compile=jit_compile if jit_compile is not None else kernel not in ("onednn", BY_BATCH),
                         **kwargs)
        self.requested_kernel = kernel
        self.kernel = kernel
        self.xla_max_batch = xla_max_batch if xla_max_batch is not None else 1
        self.kernel_choice: dict[str, Any] | None = None
        if self.config.weight_only:
            # weight-only layers run a float product on dequantized weights: nothing to rewrite
            self.requested_kernel = self.kernel = "keras"

    def params(self) -> dict[str, Any]:
        p = super().params()
        p["kernel_requested"] = self.requested_kernel
        if BY_BATCH in (self.kernel, self.requested_kernel):
            p["xla_max_batch"] = self.xla_max_batch
        if self.kernel_choice is not None:
            p["kernel_choice"] = self.kernel_choice
        return p

    def _forms_needed(self) -> tuple[str, ...]:
        return ("xla", "onednn") if self.requested_kernel == BY_BATCH else \
            (self.requested_kernel,) if self.requested_kernel in KERNELS else ()

    def _missing_form(self, caps) -> tuple[str, str] | None:
        """(form, why) for the first form the requested kernel needs that does not run here, else None."""
        forms = caps.int8_kernel_forms()
        return next(((f, forms[f][1]) for f in self._forms_needed() if not forms[f][0]), None)

    def unavailable(self, caps) -> str:
        missing = self._missing_form(caps)
        return f"int8 kernel form '{missing[0]}' does not run here: {missing[1]}" if missing else ""

    def same_as_another_at(self, shapes) -> str:
        if self.requested_kernel != BY_BATCH or not shapes:
            return ""
        small = [b for b, _ in shapes if b <= self.xla_max_batch]
        if small and len(small) < len(shapes):
            return ""
        form = "xla" if small else "onednn"
        return (f"kernel='by-batch' runs the '{form}' form at every shape of this run (batch split at "
                f"{self.xla_max_batch}): the same as kernel='{form}'")

    def check(self, source) -> None:
        """Refuse, before any work, a kernel form this machine cannot run."""
        from tfaccel.compat import capabilities

        missing = self._missing_form(capabilities())
        if missing:
            form, why = missing
            other = "kernel='xla' (runs anywhere) or kernel='auto'" if form == "onednn" else \
                "kernel='auto' or kernel='keras'"
            what = "" if form == self.requested_kernel else f" (its '{form}' form)"
            raise PlanError(f"Step 'int8' with kernel='{self.requested_kernel}'{what} cannot run on this machine: "
                            f"{why}. Use {other}.")

    def _write(self, qmodel, ctx: StepContext) -> None:
        if self.kernel != BY_BATCH:
            super()._write(qmodel, ctx)
            return
        ctx.log(f"  writing SavedModel (products: xla up to batch {self.xla_max_batch}, onednn above)")
        rewritten = write_by_batch_saved_model(qmodel, ctx.stage_dir, self.xla_max_batch)
        ctx.note(f"int8 products: XLA-compiled at batch <= {self.xla_max_batch}, oneDNN's int8 inner product "
                 f"above ({len(rewritten)} layers rewritten); serve it with a TensorFlow that has oneDNN "
                 "(x86-64 Linux/Windows wheels, AVX-512)")

    def _resolve_kernel(self, ctx: StepContext, qmodel) -> None:
        if self.kernel in ("onednn", BY_BATCH):
            check_onednn_int8()
        if self.kernel == "onednn":
            ctx.note("int8 products run in oneDNN's int8 kernel: serve this SavedModel with a TensorFlow that has "
                     "oneDNN on a CPU that runs it (x86-64 Linux/Windows wheels, AVX-512); kernel='xla' gives one "
                     "that runs anywhere")
        if self.requested_kernel != "auto":
            return
        from tfaccel.compat import capabilities

        available = capabilities().int8_kernel_forms()
        forms = {f: f != "onednn" for f in KERNELS if available[f][0]}
        excluded = {f: why for f, (ok, why) in available.items() if not ok}
        shapes = ctx.shapes or [(1, ctx.source.default_seq)]
        inputs = {tuple(sh): ctx.source.make_inputs(*sh) for sh in shapes}
        ctx.log(f"  kernel='auto': timing int8 forms {', '.join(forms)} at "
                + ", ".join(f"{b}x{q}" for b, q in inputs))
        medians, failed = _time_kernel_forms(qmodel, forms, inputs, log=ctx.log)
        excluded.update(failed)
        if not medians:
            raise StepError(f"No int8 kernel form runs on this model here: {excluded}")
        split = by_batch_split(medians)
        if split is not None:  # XLA wins the small batches, oneDNN the large ones: keep both
            self.kernel, self.xla_max_batch, self.jit_compile = BY_BATCH, split, False
        else:
            self.kernel = choose_kernel(medians)
            self.jit_compile = forms[self.kernel]
        self.kernel_choice = {"chosen": self.kernel, "median_ms": medians, "left_out": excluded}
        ctx.note(f"kernel='auto' chose '{self.kernel}': median ms " + "; ".join(
            f"{f} " + ", ".join(f"{sh} {ms:.2f}" for sh, ms in m.items()) for f, m in medians.items())
            + ("" if not excluded else "; left out: " + "; ".join(f"{f} ({why})" for f, why in excluded.items())))


class Int4Step(_KerasQuantizeStep):
    """Keras model -> int4 weight-only SavedModel (Keras ``quantize("int4")``): the smallest artifact;
    weights are unpacked and dequantized on every call, so it is not faster than float32.

    Args:
        config: a :class:`QuantizationConfig` (mode is forced to "int4"), or its dict.
        block_size: input rows per weight scale (Keras' default 128); None: one scale per channel.
        jit_compile: XLA-compile the serving function (default True).
        layer_types, include, exclude, keep_head: shortcuts for the config fields.
    """

    name = "int4"
    mode = "int4"
    default_tolerance = INT4_TOLERANCE
    kernel = "keras"
