"""Pipeline steps for the ONNX KV-cache decoder: `onnx-decoder`, `ort-decoder-int8`, `ort-decoder-int4`.

Each writes a decoder folder (``decoder.onnx`` + ``decoder.json``), a side artifact of kind
``onnx_decoder``. The pipeline compares its prefill logits with the Keras model's on the sample inputs
(the decoder's ``attention_mask`` takes the padding mask, so every position is comparable); the step
itself checks greedy generation against keras-hub's ``generate`` on the sample prompts: free-running
token agreement, teacher-forced next-token agreement and next-token logits cosine, all in the report
notes. The step fails when the next-token logits cosine is under ``min_next_token_cosine`` or the
teacher-forced next-token agreement under ``min_token_agreement`` (None: reported, not enforced: random-weight
models, like the built-in GPT-2 examples, have near-tied top logits that int8/int4 noise flips).

Where the source carries held-out text (gpt2-bbc's held-out articles, or the user's ``--eval-texts``), each
step also measures perplexity, its ratio to the Keras model's, the KL divergence of the next-token
distributions and the same-top-token rate, teacher-forced through the decoder's own decode steps
(:mod:`tfaccel.generation.quality`), and fails beyond ``max_perplexity_ratio`` / ``max_kl`` /
``min_same_top`` (defaults: ratio 1.01, KL 0.01, same-top not enforced).
"""

from __future__ import annotations

from tfaccel.core.artifact import Artifact
from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.errors import StepError


class _DecoderStepBase(Step):
    """Shared: the agreement check against keras-hub ``generate`` and the artifact it returns."""

    produces = "onnx_decoder"
    side_artifact = True
    default_min_token_agreement: float | None = 0.99
    default_min_next_token_cosine: float = 0.9999

    def __init__(self, check_new_tokens: int = 8, min_token_agreement: float | None | str = "default",
                 min_next_token_cosine: float | None = None, max_perplexity_ratio: float | None | str = "default",
                 max_kl: float | None | str = "default", min_same_top: float | None = None,
                 quality_windows: int | None = None, **kwargs):
        super().__init__(**kwargs)
        from tfaccel.generation.quality import quality_budget

        self.quality_budget, self.quality_windows = quality_budget(max_perplexity_ratio, max_kl, min_same_top,
                                                                   quality_windows)
        if not isinstance(check_new_tokens, int) or check_new_tokens < 1:
            raise ValueError(f"check_new_tokens must be an int >= 1. Received: check_new_tokens={check_new_tokens!r}")
        m = self.default_min_token_agreement if min_token_agreement == "default" else min_token_agreement
        if m is not None and not 0.0 <= m <= 1.0:
            raise ValueError(f"min_token_agreement must be in [0, 1] or None. Received: min_token_agreement={m!r}")
        c = self.default_min_next_token_cosine if min_next_token_cosine is None else min_next_token_cosine
        if not -1.0 <= c <= 1.0:
            raise ValueError(f"min_next_token_cosine must be in [-1, 1]. Received: min_next_token_cosine={c!r}")
        self.check_new_tokens = check_new_tokens
        self.min_token_agreement = None if m is None else float(m)
        self.min_next_token_cosine = float(c)
        self._default_bounds = min_token_agreement == "default" and min_next_token_cosine is None

    def _base_params(self):
        return {"check_new_tokens": self.check_new_tokens, "min_token_agreement": self.min_token_agreement,
                "min_next_token_cosine": self.min_next_token_cosine, **self.quality_budget.to_dict(),
                "quality_windows": self.quality_windows}

    def check(self, source):
        if source.task != "causal_lm" or source.kind != "keras":
            raise StepError(f"Step '{self.name}' needs a keras-hub causal LM (GPT-2, Llama, Mistral, Qwen) as the "
                            f"source; this source is a {source.task} {source.kind}. Load it with --task causal_lm.")

    def _validate(self, folder, ctx: StepContext) -> dict:
        from tfaccel.generation.agreement import decoder_agreement
        from tfaccel.generation.generators import OnnxDecoderGenerator

        x = ctx.source.sample_inputs
        ids, mask = x["token_ids"][:4].astype("int32"), x["padding_mask"][:4].astype("int32")
        gen = OnnxDecoderGenerator(folder)
        res = decoder_agreement(ctx.source.model, gen, ids, mask, self.check_new_tokens)
        ctx.note(f"greedy vs keras-hub generate on {res['prompts']} sample prompts x {res['new_tokens']} new tokens: "
                 f"{res['token_agreement']:.1%} of tokens the same (free-running), next-token argmax "
                 f"{res['next_token_agreement']:.1%}, next-token logits cosine min {res['next_token_cosine_min']:.5f}")
        ctx.note(f"Keras model's top-1 - top-2 logit gap: median {res['logit_gap_p50']:.3g}, 5th percentile "
                 f"{res['logit_gap_p05']:.3g}; this decoder moves that gap by {res['gap_error_p50']:.3g} (median), "
                 f"more than the gap itself at {res['gap_exceeded']:.1%} of positions (where greedy tokens can flip)")
        if res["next_token_cosine_min"] < self.min_next_token_cosine:
            raise StepError(
                f"Step '{self.name}': next-token logits cosine with the Keras model is {res['next_token_cosine_min']:.5f} "
                f"< {self.min_next_token_cosine}. Loosen --set {self.name}.min_next_token_cosine=..., or use a less "
                "lossy setting.")
        if self.min_token_agreement is not None and res["next_token_agreement"] < self.min_token_agreement:
            raise StepError(
                f"Step '{self.name}': the decoder's next token differs from keras-hub's on "
                f"{1 - res['next_token_agreement']:.1%} of positions (allowed {1 - self.min_token_agreement:.1%}). "
                f"Loosen --set {self.name}.min_token_agreement=..., or use a less lossy setting.")
        from tfaccel.generation.quality import validate_quality

        quality = validate_quality(ctx, gen, self.quality_budget, self.name, windows=self.quality_windows)
        if quality is not None:
            res["quality"] = quality
        return res

    def _artifact(self, folder, artifact: Artifact, info: dict) -> Artifact:
        return Artifact(kind=self.produces, path=str(folder), input_names=artifact.input_names, info=info)


#: The onnx-decoder step's own effect on a model with GPTQ / AWQ layers (measured cosine 0.99999 on gpt2-tiny).
CARRIED_TOLERANCE = Tolerance(max_abs_diff=None, min_cosine=0.999, max_accuracy_drop=None)


class OnnxDecoderStep(_DecoderStepBase):
    """keras-hub CausalLM -> ONNX decoder with past/present KV-cache tensors (tf2onnx). A side artifact.

    Args:
        opset: ONNX opset.
        graph: ``auto`` (default: the native graph written directly in ONNX with onnxruntime's fused attention
            for GPT-2 and the Llama class, the traced graph where the native builder refuses a model of those
            classes; the decoder step takes GPT-2, Llama, Llama 3, Mistral and Qwen), ``native`` or
            ``keras-layers`` (see :func:`tfaccel.onnx.decoder_export.export_decoder`; TensorRT needs the latter).
        check_new_tokens: new tokens per sample prompt for the agreement check.
        min_token_agreement: the lowest teacher-forced next-token agreement with keras-hub allowed (default
            0.99: float32 decoding picks keras-hub's tokens; a float near-tie may flip one).
        min_next_token_cosine: the lowest next-token logits cosine allowed (default 0.9999).
    """

    name = "onnx-decoder"
    consumes = "keras"
    # the same float32 math as the Keras layers, fused and reordered by onnxruntime
    default_tolerance = Tolerance(max_abs_diff=1e-3, min_cosine=0.9999, max_accuracy_drop=0.0)

    def __init__(self, opset: int = 17, graph: str = "auto", **kwargs):
        super().__init__(**kwargs)
        from tfaccel.onnx.decoder_export import GRAPHS

        if not isinstance(opset, int) or not 13 <= opset <= 21:
            raise ValueError(f"opset must be an int from 13 to 21. Received: opset={opset!r}")
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {', '.join(GRAPHS)}. Received: graph={graph!r}")
        self.opset, self.graph = opset, graph

    def params(self):
        return {"opset": self.opset, "graph": self.graph, **self._base_params()}

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        from tfaccel.onnx.decoder_export import (
            NATIVE,
            decoder_layout,
            export_decoder,
            resolve_graph,
        )

        decoder_layout(artifact.model)  # a clear error for unsupported families, before any work
        try:
            graph, refusal = resolve_graph(artifact.model, self.graph)
        except StepError as exc:
            raise StepError(f"Step '{self.name}': {exc} On the command line: --set {self.name}.graph=auto.") from exc
        carried = sorted({m for layer in artifact.model._flatten_layers()
                          if (m := getattr(layer, "quantization_mode", None)) in ("gptq", "awq")})
        if carried:
            # the carried 4-bit products run on int8-quantized activations (MatMulNBits accuracy_level 4),
            # where the Keras layers multiply float activations by the dequantized weights
            self.bound_by(CARRIED_TOLERANCE)
        if carried and self._default_bounds:  # checked against the float source model: int4's bounds
            self.min_token_agreement = OrtDecoderInt4Step.default_min_token_agreement
            self.min_next_token_cosine = OrtDecoderInt4Step.default_min_next_token_cosine
        layout = export_decoder(artifact.model, ctx.stage_dir, opset=self.opset, graph=graph, log=ctx.log)
        if carried:
            ctx.note(f"{', '.join(m.upper() for m in carried)} 4-bit weights carried unchanged into MatMulNBits "
                     "(the same integers, scales and groups)")
        why = f" (not native: {refusal})" if graph != NATIVE and self.graph == "auto" else ""
        ctx.note(f"{layout.family}: {layout.num_layers} layers, {layout.num_kv_heads} KV heads x {layout.head_dim}; "
                 f"one graph for prefill (past length 0) and decode; {graph} graph{why}")
        res = self._validate(ctx.stage_dir, ctx)
        return self._artifact(ctx.stage_dir, artifact, {"layout": layout.to_dict(), **res})


class OrtDecoderInt8Step(_DecoderStepBase):
    """ONNX decoder -> int8 decoder. A side artifact.

    Args:
        method: ``blockwise`` (default: 8-bit weights with a scale per ``block_size`` rows in ``MatMulNBits``,
            int8 dot products on activations quantized per block inside the kernel; the faster and closer one at
            batch 1) or ``dynamic`` (onnxruntime's ``MatMulInteger``, activations quantized per call; faster
            from batch ~8 on VNNI CPUs). See :func:`tfaccel.onnx.decoder_quantize.quantize_decoder_int8`.
        block_size: ``blockwise``: rows per block (16-256, default 64).
        per_channel: ``dynamic``: per-column weight scales (default on); None: ``tfaccel.compat``'s choice.
        reduce_range: ``dynamic``: 7-bit weights; None (default): on for CPUs without VNNI.
        min_token_agreement: lowest teacher-forced next-token agreement allowed (default None: reported only).
        min_next_token_cosine: lowest next-token logits cosine allowed (default 0.99).
    """

    name = "ort-decoder-int8"
    consumes = "onnx_decoder"
    # int8 weights and activations: logits move by ~1e-2 relative (measured cosine > 0.999 on gpt2-tiny)
    default_tolerance = Tolerance(max_abs_diff=None, min_cosine=0.98, max_accuracy_drop=None)
    default_min_token_agreement = None
    default_min_next_token_cosine = 0.99

    def __init__(self, method: str = "blockwise", block_size: int | None = None, per_channel: bool | None = True,
                 reduce_range: bool | None = None, **kwargs):
        super().__init__(**kwargs)
        from tfaccel.onnx.decoder_quantize import INT8_BLOCK_SIZE, INT8_METHODS, NBITS_BLOCK_SIZES

        if method not in INT8_METHODS:
            raise ValueError(f"method must be one of {INT8_METHODS}. Received: method={method!r}")
        block_size = INT8_BLOCK_SIZE if block_size is None else block_size
        if block_size not in NBITS_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {NBITS_BLOCK_SIZES}. Received: block_size={block_size!r}")
        self.method, self.block_size = method, block_size
        self.per_channel, self.reduce_range = per_channel, reduce_range

    def params(self):
        own = {"method": self.method, "block_size": self.block_size} if self.method == "blockwise" else {
            "method": self.method, "per_channel": self.per_channel, "reduce_range": self.reduce_range}
        return {**own, **self._base_params()}

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        from tfaccel.onnx.decoder_quantize import quantize_decoder_int8

        if self.method == "blockwise":
            ctx.log(f"  8-bit weights in blocks of {self.block_size} (MatMulNBits, int8 dot products)")
        else:
            ctx.log("  onnxruntime dynamic int8 on every weight MatMul of the decoder")
        info = quantize_decoder_int8(artifact.path, ctx.stage_dir, method=self.method, block_size=self.block_size,
                                     per_channel=self.per_channel, reduce_range=self.reduce_range)
        if self.method == "blockwise":
            kept = info.get("already_quantized", 0)
            ctx.note(f"{info['matmuls_quantized']} float weight products 8-bit in blocks of {self.block_size} "
                     f"(MatMulNBits, accuracy_level 4){f'; {kept} already quantized kept' if kept else ''}"
                     f"{'; the tied embedding stored once' if info['tied_embedding'] else ''}")
        else:
            ctx.note(f"{info['matmuls_quantized']} MatMuls int8 ({info['gemm_rewritten']} Gemms rewritten to MatMul), "
                     f"per_channel={info['per_channel']}, reduce_range={info['reduce_range']}")
        res = self._validate(ctx.stage_dir, ctx)
        return self._artifact(ctx.stage_dir, artifact, {**info, **res})


class OrtDecoderInt4Step(_DecoderStepBase):
    """ONNX decoder -> int4 weight-only decoder (``MatMulNBits``). A side artifact.

    Args:
        block_size: input rows per 4-bit block (16-256, default 32).
        symmetric: symmetric blocks without zero points (default).
        accuracy_level: MatMulNBits compute type (4: int8 activations, the fastest on x86).
        head_bits: the LM head's bits, 8 (default: the head, or the tied embedding table it shares, stays
            8-bit beside 4-bit weights; it sets every next-token logit) or 4 (every weight 4-bit).
        head_block_size: the LM head's block (default ``block_size``).
        min_token_agreement: lowest teacher-forced next-token agreement allowed (default None: reported only).
        min_next_token_cosine: lowest next-token logits cosine allowed (default 0.9; measured 0.957 on
            gpt2-small with random weights, block 32).
    """

    name = "ort-decoder-int4"
    consumes = "onnx_decoder"
    # 4-bit weights: logits move by a few percent (measured cosine 0.99 on gpt2-tiny with block 16, 0.96 on
    # gpt2-small with random weights and block 32)
    default_tolerance = Tolerance(max_abs_diff=None, min_cosine=0.9, max_accuracy_drop=None)
    default_min_token_agreement = None
    default_min_next_token_cosine = 0.9

    def __init__(self, block_size: int = 32, symmetric: bool = True, accuracy_level: int = 4, head_bits: int = 8,
                 head_block_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        from tfaccel.onnx.decoder_quantize import NBITS_BLOCK_SIZES

        if block_size not in NBITS_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {NBITS_BLOCK_SIZES}. Received: block_size={block_size!r}")
        if head_bits not in (4, 8):
            raise ValueError(f"head_bits must be 4 or 8. Received: head_bits={head_bits!r}")
        if head_block_size is not None and head_block_size not in NBITS_BLOCK_SIZES:
            raise ValueError(f"head_block_size must be one of {NBITS_BLOCK_SIZES}. "
                             f"Received: head_block_size={head_block_size!r}")
        self.block_size, self.symmetric, self.accuracy_level = block_size, bool(symmetric), accuracy_level
        self.head_bits, self.head_block_size = head_bits, head_block_size

    def params(self):
        return {"block_size": self.block_size, "symmetric": self.symmetric, "accuracy_level": self.accuracy_level,
                "head_bits": self.head_bits, "head_block_size": self.head_block_size, **self._base_params()}

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        from tfaccel.onnx.decoder_quantize import quantize_decoder_int4

        ctx.log(f"  int4 weight-only (MatMulNBits, block {self.block_size}; LM head {self.head_bits}-bit)")
        info = quantize_decoder_int4(artifact.path, ctx.stage_dir, block_size=self.block_size,
                                     symmetric=self.symmetric, accuracy_level=self.accuracy_level,
                                     head_bits=self.head_bits, head_block_size=self.head_block_size)
        kept = info.get("already_quantized", 0)
        ctx.note(f"{info['matmuls_quantized']} float weight products int4 (block {self.block_size}, round to nearest)"
                 f"{f'; {kept} already quantized kept' if kept else ''}"
                 f"{'; the tied embedding stored once' if info['tied_embedding'] else ''}")
        res = self._validate(ctx.stage_dir, ctx)
        return self._artifact(ctx.stage_dir, artifact, {**info, **res})
