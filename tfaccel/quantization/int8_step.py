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
``python -m tfaccel.quantization.benchmark`` compares the kernel forms with each other.

"xla" is the default: it runs on any TensorFlow and is the fastest TensorFlow form at batch 1;
"onednn" is the throughput choice for large batches of large models.
"""

from __future__ import annotations

import json
from typing import Any

from tfaccel.artifacts import Artifact
from tfaccel.errors import StepError
from tfaccel.pipeline import Step, StepContext
from tfaccel.quantization.int8_kernels import KERNELS, int8_kernels
from tfaccel.quantization.keras_quantize import quantize_model
from tfaccel.quantization.quantization_config import QuantizationConfig
from tfaccel.quantization.quantization_report import QuantizationSummary
from tfaccel.validation import Tolerance

# int8 weights and activations change logits by about 1%; what a user keeps is the prediction:
# at most 1 point of accuracy on the eval split, and outputs still pointing the same way.
INT8_TOLERANCE = Tolerance(max_abs_diff=None, min_cosine=0.98, max_accuracy_drop=0.01)
# int4 weights (16 levels per group of 128) move outputs more than int8 does.
INT4_TOLERANCE = Tolerance(max_abs_diff=None, min_cosine=0.95, max_accuracy_drop=0.01)


def check_onednn_int8() -> None:
    """Raise StepError if this TensorFlow cannot run oneDNN's int8 inner product.

    Example:
        >>> check_onednn_int8()  # doctest: +SKIP  (passes on x86-64 Linux TensorFlow wheels)
    """
    import numpy as np
    import tensorflow as tf

    from tfaccel.quantization.int8_kernels import int8_matmul_onednn

    x = tf.constant(np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16))
    kq = tf.constant(np.arange(-64, 64, dtype=np.int8).reshape(16, 8))
    sums = tf.constant(kq.numpy().astype(np.float32).sum(0))
    scale = tf.ones([8])
    try:
        got = int8_matmul_onednn(x, kq, scale, sums).numpy()
    except Exception as exc:  # the op has no kernel in builds without oneDNN
        raise StepError(
            "kernel='onednn' needs TensorFlow's oneDNN int8 kernels, which this TensorFlow does not run "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). They exist in x86-64 "
            "Linux/Windows builds with TF_ENABLE_ONEDNN_OPTS unset or 1. Use kernel='xla'."
        ) from exc
    want = x.numpy() @ kq.numpy().astype(np.float32)
    if not np.allclose(got, want, atol=0.05 * np.abs(want).max()):
        raise StepError("oneDNN's int8 inner product gave wrong results on this machine. Use kernel='xla'.")


class _KerasQuantizeStep(Step):
    consumes = "keras"
    produces = "saved_model"
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

    def _resolve_kernel(self, ctx: StepContext) -> None:
        """Hook for subclasses: settle the kernel form before the model is written."""

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        from tfaccel.saved_model import write_saved_model

        self._resolve_kernel(ctx)
        ctx.log(f"  Keras {self.mode} quantization of the selected layers")
        qmodel, summary = quantize_model(artifact.model, self.config, copy=True)
        summary.kernel = self.kernel
        self.summary = summary
        for line in summary.notes():
            ctx.note(line)
        with int8_kernels(qmodel, self.kernel) as rewritten:
            ctx.log(f"  writing SavedModel (products: {self.kernel}, jit_compile={self.jit_compile}, "
                    f"{len(rewritten)} rewritten)")
            write_saved_model(qmodel, ctx.stage_dir, jit_compile=self.jit_compile)
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
        kernel: how int8 products run (see :mod:`tfaccel.quantization.int8_kernels`): "xla" (default:
            int8 dot in an XLA-compiled serving function; runs on any TensorFlow; fastest at batch 1),
            "onednn" (oneDNN's u8s8 int8 inner product, no XLA: fastest for large batches of a large
            model, slower than "xla" on small models; the SavedModel needs a TensorFlow with oneDNN,
            i.e. x86-64 Linux/Windows wheels with TF_ENABLE_ONEDNN_OPTS not 0), or "keras" (Keras' own
            int8 calls, for comparison).
        jit_compile: XLA-compile the serving function. Default: False for "onednn" (XLA cannot
            compile oneDNN's quantized op), True otherwise.
        layer_types, include, exclude, keep_head, weight_only: shortcuts for the config fields.

    Example:
        >>> Pipeline([Int8Step(exclude=("pooled_dense",))]).run(load_source("minilm-bbc"), "out")  # doctest: +SKIP
        >>> Pipeline([Int8Step(kernel="onednn")], shapes=[(32, 128)]).run(load_source("bert-base"), "out")  # doctest: +SKIP
    """

    name = "int8"
    mode = "int8"
    default_tolerance = INT8_TOLERANCE

    def __init__(self, config=None, *, kernel: str = "xla", jit_compile: bool | None = None, **kwargs):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}. Received: kernel={kernel!r}")
        if kernel == "onednn" and jit_compile:
            raise ValueError("kernel='onednn' cannot be XLA-compiled (XLA has no kernel for oneDNN's quantized op). "
                             "Received: jit_compile=True; use kernel='xla' for an XLA-compiled int8 SavedModel.")
        super().__init__(config, jit_compile=jit_compile if jit_compile is not None else kernel != "onednn", **kwargs)
        self.kernel = kernel
        if self.config.weight_only:
            self.kernel = "keras"  # weight-only layers run a float product on dequantized weights: nothing to rewrite

    def _resolve_kernel(self, ctx: StepContext) -> None:
        if self.kernel == "onednn":
            check_onednn_int8()
            ctx.note("int8 products run in oneDNN's int8 kernel: serve this SavedModel with a TensorFlow that has "
                     "oneDNN (x86-64 Linux/Windows wheels); kernel='xla' gives one that runs anywhere")


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
