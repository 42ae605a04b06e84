"""GPTQ and AWQ 4-bit weights through Keras (``Model.quantize("gptq" | "awq", config=...)``), calibrated on a
causal LM's text: the ``gptq`` and ``awq`` steps (Keras model -> Keras model with quantized layers).

Their integers, group scales and zero points are carried unchanged into the ONNX decoder (``gptq,onnx-decoder``:
``MatMulNBits`` on the same integers, :func:`tfaccel.onnx.decoder_quantize.keras_quantized_matrix`) and into the
generate SavedModel (``gptq,generate``: the Keras layers dequantize their packed integers). The layers GPTQ/AWQ
leave in float (the token embedding and LM head) can be quantized after that by ``ort-decoder-int8`` /
``ort-decoder-int4``, which leave the carried products as they are.

Calibration text: the user's ``--calibration-data``, else the source's held-out windows after the ones the
quality checks score (so the figures are not measured on the calibration text), else all of them (the step
says so).

Keras 3.15.1's calibration is dead (keras-team/keras#23512, merged after the 3.15.1 release): its hooks patch
``layer.call``, but once a layer has its quantized dtype policy Keras runs ``layer.quantized_call``, so GPTQ's
Hessians and AWQ's activation statistics stay zero and both silently become round-to-nearest. Where
:func:`tfaccel.compat.keras_quantization_calibration_hooks_dead` says so, :func:`live_calibration_hooks` puts the
same hooks on ``quantized_call`` (which runs the float kernel until calibration completes) for the duration of
``Model.quantize``; Keras's algorithms are otherwise used as they are.
"""

from __future__ import annotations

import contextlib

import numpy as np

from tfaccel.core.artifact import Artifact
from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.errors import StepError

#: Calibration windows used unless told otherwise (Keras' default is 128).
DEFAULT_SAMPLES = 128


@contextlib.contextmanager
def live_calibration_hooks():
    """While quantizing: Keras' GPTQ / AWQ statistics hooks on ``quantized_call`` instead of ``call`` (module
    docstring). Does nothing where Keras' own hooks work."""
    from tfaccel.compat import keras_quantization_calibration_hooks_dead

    if not keras_quantization_calibration_hooks_dead():
        yield
        return
    from keras import ops
    from keras.src.quantizers import awq_core, gptq_core

    def streaming(update: str):
        @contextlib.contextmanager
        def stream(layers_map, objects):
            patched = []

            def hook(name, original):
                def quantized_call(*args, **kwargs):
                    x = args[0] if args else kwargs["inputs"]
                    getattr(objects[name], update)(ops.reshape(x, (-1, objects[name].rows)))
                    return original(*args, **kwargs)

                return quantized_call

            try:
                for name, layer in layers_map.items():
                    layer.quantized_call = hook(name, layer.quantized_call)
                    patched.append(layer)
                yield
            finally:
                for layer in patched:
                    del layer.quantized_call  # the class's method again

        return stream

    saved = gptq_core.stream_hessians, awq_core.stream_activations
    gptq_core.stream_hessians = streaming("update_hessian_with_batch")
    awq_core.stream_activations = streaming("update_activation_magnitudes")
    try:
        yield
    finally:
        gptq_core.stream_hessians, awq_core.stream_activations = saved


def gptq_quantize_matrix_numpy(weights_transpose, inv_hessian, *, blocksize=128, group_size=-1,
                               activation_order=False, order_metric=None, compute_scale_zero=None):
    """Keras 3.15's ``keras.src.quantizers.gptq.gptq_quantize_matrix``, line for line in numpy.

    Keras runs GPTQ's column loop as eager TensorFlow ops (one ``slice_update``, an XLA op run through its
    eager fallback, per column and buffer): 127 of the 167 seconds of GPTQ on gpt2-bbc, 4 layers of width 256,
    on 2 cores. The same arithmetic in numpy takes seconds. The group parameters still come from Keras' own
    ``compute_scale_zero`` (``GPTQQuantizer.find_params``), the rounding is the same (half to even), and the
    quirks are kept (a group's parameters read from the weights as they were at the start of the 128-column
    block, as Keras does), so the integers are Keras'.

    Returns:
        ``(quantized [out, in] int32, scale [out, groups], zero [out, groups], g_idx [in] float32)`` as numpy.
    """
    from keras import ops

    w = np.array(ops.convert_to_numpy(weights_transpose), dtype=np.float32)
    hinv = np.array(ops.convert_to_numpy(inv_hessian), dtype=np.float32)
    out_features, in_features = w.shape
    perm = inv_perm = None
    if activation_order:
        if order_metric is None:
            metric = 1.0 / (np.diagonal(hinv) + 1e-12)
        else:
            metric = np.asarray(ops.convert_to_numpy(order_metric), np.float32)
            metric = np.where(np.isfinite(metric), metric, 0.0)
        jitter = np.arange(in_features, dtype=np.float32) / np.float32(in_features) * np.float32(1e-12)
        perm = np.argsort(-(metric + jitter), kind="stable")
        inv_perm = np.argsort(perm, kind="stable")
        w = w[:, perm]
        hinv = hinv[perm][:, perm]
    weights_buffer = w
    quantized = np.zeros((out_features, in_features), np.int32)
    scale_chunks, zero_chunks = [], []
    effective_group = in_features if group_size == -1 else group_size

    def params(group):
        scale, zero, maxq = compute_scale_zero(group)
        return (np.asarray(ops.convert_to_numpy(scale), np.float32), np.asarray(ops.convert_to_numpy(zero)),
                np.float32(ops.convert_to_numpy(maxq)))

    for block_start in range(0, in_features, blocksize):
        block_end = min(block_start + blocksize, in_features)
        block_weights = weights_buffer[:, block_start:block_end].copy()
        block_error = np.zeros_like(block_weights)
        block_hinv = hinv[block_start:block_end, block_start:block_end]
        cached, cached_start = None, -1
        for j in range(block_end - block_start):
            col = block_start + j
            start = (col // effective_group) * effective_group if effective_group != in_features else 0
            if start != cached_start:
                end = min(start + effective_group, in_features)
                cached = params(weights_buffer[:, start:end] if effective_group != in_features else weights_buffer)
                scale_chunks.append(cached[0])
                zero_chunks.append(cached[1])
                cached_start = start
            scale, zero, maxq = cached
            safe = np.where(scale == 0, np.float32(1e-8), scale)
            zf = zero.astype(np.float32)
            q = np.clip(np.round(block_weights[:, j: j + 1] / safe + zf), 0, maxq)
            quantized[:, col] = q[:, 0].astype(np.int32)
            deq = (scale * (q - zf))[:, 0]
            err = (block_weights[:, j] - deq) / block_hinv[j, j]
            block_error[:, j] = err
            if j < block_end - block_start - 1:
                block_weights[:, j + 1:] -= np.outer(err, block_hinv[j, j + 1:])
        if block_end < in_features:
            weights_buffer = np.concatenate(
                [weights_buffer[:, :block_end], weights_buffer[:, block_end:] - block_error @ hinv[block_start:block_end,
                                                                                                   block_end:]], axis=1)
    g_idx = (np.arange(in_features, dtype=np.int32) / effective_group).astype(np.float32)
    if activation_order:
        g_idx = g_idx[inv_perm]
        quantized = quantized[:, inv_perm]
    if not scale_chunks:
        s, z, _ = params(w)
        scale, zero = s, z
    else:
        scale, zero = np.concatenate(scale_chunks, axis=1), np.concatenate(zero_chunks, axis=1)
    return quantized, scale, zero, g_idx


@contextlib.contextmanager
def numpy_gptq_matrix():
    """While quantizing: Keras' GPTQ column loop run by :func:`gptq_quantize_matrix_numpy` (the same integers,
    seconds instead of minutes)."""
    from keras.src.quantizers import gptq

    saved = gptq.gptq_quantize_matrix
    gptq.gptq_quantize_matrix = gptq_quantize_matrix_numpy
    try:
        yield
    finally:
        gptq.gptq_quantize_matrix = saved


class _PreTokenized:
    """What GPTQConfig / AWQConfig require as ``tokenizer`` when the dataset is already token ids (Keras only
    tokenizes string datasets)."""

    def tokenize(self, text):
        raise StepError("The calibration windows are token ids; no text should reach a tokenizer.")

    __call__ = tokenize


def calibration_windows(source, skip: int) -> tuple[np.ndarray, str]:
    """The token windows GPTQ / AWQ calibrate on (module docstring), and how they were chosen.

    Raises:
        StepError: the source has neither calibration text nor held-out text.
    """
    from tfaccel.generation.eval_text import eval_windows

    cal = getattr(source, "calibration_inputs", None)
    if cal is not None and "token_ids" in cal:
        return np.asarray(cal["token_ids"], np.int32), f"the calibration text ({source.data_files.get('calibration')})"
    held = eval_windows(source)
    if held is None:
        raise StepError("GPTQ / AWQ calibrate on text, and this source carries none: pass --calibration-data FILE "
                        "(.txt / .jsonl / .csv, tokenized with the model's tokenizer) or --eval-texts FILE.")
    if len(held) > skip + 8:
        return held[skip:], f"{len(held) - skip} held-out windows not scored by the quality checks"
    return held, (f"all {len(held)} held-out windows (too few to keep the {skip} the quality checks score apart: "
                  "the quality figures are measured on calibration text)")


def keras_quantize_causal_lm(model, mode: str, windows: np.ndarray, *, copy: bool = True, **options):
    """Quantize a keras-hub CausalLM's transformer layers with Keras' GPTQ or AWQ, calibrated on ``windows``.

    Args:
        model: a keras-hub CausalLM (it declares the layer structure GPTQ / AWQ walk).
        mode: ``"gptq"`` or ``"awq"``.
        windows: int ``[n, width]`` token windows.
        copy: quantize a copy and leave ``model`` as it was.
        **options: ``GPTQConfig`` / ``AWQConfig`` arguments (``weight_bits``, ``group_size``, ``symmetric``,
            ``num_samples``, ``hessian_damping``, ``num_grid_points``...); ``sequence_length`` defaults to the
            window width.

    Returns:
        The quantized model.

    Example:
        >>> q = keras_quantize_causal_lm(gpt2, "gptq", windows, group_size=32, symmetric=True)  # doctest: +SKIP
    """
    from keras.quantizers import AWQConfig, GPTQConfig

    from tfaccel.quantization.keras_quantize import clone_model

    if mode not in ("gptq", "awq"):
        raise ValueError(f"mode must be 'gptq' or 'awq'. Received: mode={mode!r}")
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or len(windows) == 0:
        raise StepError(f"Calibration windows must be a non-empty [n, width] array of token ids; got {windows.shape}.")
    options.setdefault("sequence_length", int(windows.shape[1]))
    options.setdefault("num_samples", min(DEFAULT_SAMPLES, len(windows)))
    config_cls = GPTQConfig if mode == "gptq" else AWQConfig
    config = config_cls(dataset=list(windows), tokenizer=_PreTokenized(), **options)
    if copy:
        model = clone_model(model)
    import warnings

    with warnings.catch_warnings(), live_calibration_hooks(), numpy_gptq_matrix():
        warnings.simplefilter("ignore")  # "Invalid quantization mode ..." for the layers GPTQ / AWQ leave alone
        model.quantize(mode, config=config)
    quantized = [layer for layer in model._flatten_layers() if getattr(layer, "quantization_mode", None) == mode]
    if not quantized:
        raise StepError(f"Keras quantized no layer of {type(model).__name__} with {mode}.")
    return model


class _CalibratedQuantizeStep(Step):
    consumes = "keras"
    produces = "keras"
    mode = ""
    # 4-bit weights: the logits move by a few percent (as for ort-decoder-int4)
    default_tolerance = Tolerance(max_abs_diff=None, min_cosine=0.9, max_accuracy_drop=None)

    def __init__(self, group_size: int = 32, num_samples: int = DEFAULT_SAMPLES, max_perplexity_ratio="default",
                 max_kl="default", min_same_top=None, quality_windows: int | None = None, **kwargs):
        from tfaccel.generation.quality import quality_budget
        from tfaccel.onnx.decoder_graph import NBITS_BLOCK_SIZES

        super().__init__(**kwargs)
        if group_size not in NBITS_BLOCK_SIZES:
            raise ValueError(f"group_size must be one of {NBITS_BLOCK_SIZES} (the blocks the ONNX decoder's MatMulNBits "
                             f"takes). Received: group_size={group_size!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1. Received: num_samples={num_samples!r}")
        self.group_size, self.num_samples = group_size, num_samples
        self.quality_budget, self.quality_windows = quality_budget(max_perplexity_ratio, max_kl, min_same_top,
                                                                   quality_windows)

    def _options(self) -> dict:
        return {"group_size": self.group_size}

    def params(self):
        return {**self._options(), "num_samples": self.num_samples, **self.quality_budget.to_dict(),
                "quality_windows": self.quality_windows}

    def check(self, source):
        if source.task != "causal_lm" or source.kind != "keras" or not hasattr(source.model, "call_with_cache"):
            raise StepError(f"Step '{self.name}' needs a keras-hub causal LM as the source; this source is a "
                            f"{source.task} {source.kind}. Load it with --task causal_lm.")
        get = getattr(source.model, "get_quantization_layer_structure", None)
        if get is None or get(self.mode) is None:
            raise StepError(f"Step '{self.name}': {type(source.model).__name__} does not declare the layer structure "
                            f"Keras' {self.mode.upper()} walks (get_quantization_layer_structure).")
        calibration_windows(source, self._scored_windows())  # fails now, before any work, without text

    def _scored_windows(self) -> int:
        """How many leading held-out windows quality checks score: this step's own, and at least the default
        count a later step or ``--auto`` scores the chain's result on (a step inside an --auto chain has
        ``quality_windows=0`` but its decoder is scored on the first DEFAULT_EVAL_WINDOWS)."""
        from tfaccel.generation.quality import DEFAULT_EVAL_WINDOWS

        return max(self.quality_windows or 0, DEFAULT_EVAL_WINDOWS)

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        import time

        from tfaccel.generation.quality import keras_forward_logits, validate_quality

        windows, how = calibration_windows(ctx.source, self._scored_windows())
        n = min(self.num_samples, len(windows))
        ctx.log(f"  Keras {self.mode.upper()} on {n} windows of {windows.shape[1]} tokens")
        t0 = time.perf_counter()
        model = keras_quantize_causal_lm(artifact.model, self.mode, windows, num_samples=n, **self._options())
        quantized = [layer for layer in model._flatten_layers() if getattr(layer, "quantization_mode", None) == self.mode]
        layers = len(quantized)
        wide = [layer.path for layer in quantized if int(np.asarray(layer.kernel_zero).max()) > 15]
        if wide:
            ctx.note(f"{len(wide)} layers have zero points outside 4 bits (e.g. {wide[0]}): the ONNX decoder cannot carry "
                     f"them; --set {self.name}.symmetric=true avoids it")
        ctx.note(f"Keras {self.mode.upper()}: {layers} layers to 4 bits in groups of {self.group_size}, calibrated on "
                 f"{n} windows of {windows.shape[1]} tokens from {how} ({time.perf_counter() - t0:.0f}s); the token "
                 "embedding and LM head stay float (ort-decoder-int8 / -int4 can quantize them in the decoder)")
        quality = validate_quality(ctx, keras_forward_logits(model), self.quality_budget, self.name,
                                   windows=self.quality_windows, what=f"{self.mode.upper()} model",
                                   through="its forward pass")
        info = {"mode": self.mode, "layers": layers, "calibration": how, **self._options()}
        if quality is not None:
            info["quality"] = quality
        return Artifact(kind="keras", model=model, input_names=artifact.input_names, info=info)


class GptqStep(_CalibratedQuantizeStep):
    """keras-hub CausalLM -> the same model with GPTQ 4-bit transformer weights (Keras ``Model.quantize("gptq")``).

    Args:
        group_size: input rows per scale (16-256, default 32: llama.cpp Q4_0's block).
        symmetric: symmetric groups (every zero point 8). Default False: a zero point per group, closer to the
            float model (gpt2-bbc, 128 windows: KL 1.5e-4 against 1.9e-4 symmetric). Keras 3.15 does not clamp
            asymmetric zero points to 4 bits (keras#23512); a group that needs one outside 0-15 is reported here
            and refused by onnx-decoder, which then asks for ``symmetric=True``.
        hessian_damping: Keras' damping (default 0.01).
        num_samples: calibration windows (default 128).
        max_perplexity_ratio, max_kl, min_same_top, quality_windows: the quality budget on held-out text
            (:mod:`tfaccel.generation.quality`).
    """

    name = "gptq"
    mode = "gptq"

    def __init__(self, group_size: int = 32, symmetric: bool = False, hessian_damping: float = 0.01, **kwargs):
        super().__init__(group_size=group_size, **kwargs)
        if not 0.0 <= float(hessian_damping) <= 1.0:
            raise ValueError(f"hessian_damping must be in [0, 1]. Received: hessian_damping={hessian_damping!r}")
        self.symmetric, self.hessian_damping = bool(symmetric), float(hessian_damping)

    def _options(self) -> dict:
        return {"weight_bits": 4, "group_size": self.group_size, "symmetric": self.symmetric,
                "hessian_damping": self.hessian_damping}


class AwqStep(_CalibratedQuantizeStep):
    """keras-hub CausalLM -> the same model with AWQ 4-bit transformer weights (Keras ``Model.quantize("awq")``).

    Args:
        group_size: input rows per scale (16-256, default 32).
        num_grid_points: Keras' grid search points for the per-channel scales (default 20).
        num_samples: calibration windows (default 128).
        max_perplexity_ratio, max_kl, min_same_top, quality_windows: the quality budget on held-out text.
    """

    name = "awq"
    mode = "awq"

    def __init__(self, group_size: int = 32, num_grid_points: int = 20, **kwargs):
        super().__init__(group_size=group_size, **kwargs)
        if isinstance(num_grid_points, bool) or not isinstance(num_grid_points, int) or num_grid_points < 1:
            raise ValueError(f"num_grid_points must be an int >= 1. Received: num_grid_points={num_grid_points!r}")
        self.num_grid_points = num_grid_points

    def _options(self) -> dict:
        return {"group_size": self.group_size, "num_grid_points": self.num_grid_points}
