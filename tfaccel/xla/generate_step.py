"""Pipeline step `generate`: a keras-hub CausalLM SavedModel whose `generate` signatures run the whole
decode loop (KV cache included) inside the SavedModel, for every family in
:mod:`tfaccel.causal_lm_spec`."""

from __future__ import annotations

import numpy as np

from tfaccel.core.artifact import Artifact
from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.errors import PlanError, StepError
from tfaccel.xla.generate_export import (
    DEFAULT_PROMPT_BUCKETS,
    keras_hub_greedy,
    resolve_generate_limits,
    write_generate_saved_model,
)

WEIGHTS = ("float", "int8")


class GenerateStep(Step):
    """keras-hub CausalLM -> SavedModel with `serving_default` (logits), `generate` and `generate_greedy`.

    The decode loop runs inside the SavedModel (tf.while_loop with a KV cache), XLA-compiled when
    ``jit_compile`` says so ("auto": only with a GPU; on this project's CPUs XLA decoding measured slower).
    Each family's cache layout, length limit and ``call_with_cache`` come from
    :func:`tfaccel.causal_lm_spec.causal_lm_spec`; a family it cannot drive is refused at plan time.

    After writing, greedy generation from the SavedModel is compared with keras-hub's own ``generate``
    of the input (float) model on the sample prompts; at least ``min_token_agreement`` of the new tokens
    must match. With float weights the export is token-identical to keras-hub (100% on every family in
    tests/test_generate.py; the threshold only leaves room for float ties between XLA and keras-hub's graph).
    With ``weights="int8"`` (Keras int8 quantization of a copy) tokens may legitimately differ: once one
    new token differs, the rest of that row continues from another prefix.

    Args:
        max_new_tokens_cap: the largest max_new_tokens a caller may ask for (sizes the KV cache).
            None (default): min(128, what fits the model's maximum length; see
            :func:`tfaccel.xla.generate_export.resolve_generate_limits`).
        prompt_buckets: prompt widths padded to these (one compilation per batch size and bucket).
        check_new_tokens: new tokens generated per sample prompt for the agreement check.
        min_token_agreement: the share of new tokens that must equal keras-hub's greedy tokens.
        weights: "float" (the model as it is) or "int8" (Keras int8 weights and activations on a copy;
            the SavedModel is about 4x smaller in weights; logits validated with the int8 step's tolerance).
        jit_compile: True, False or "auto".
        max_perplexity_ratio, max_kl, min_same_top, quality_windows: where the source carries held-out text
            (gpt2-bbc, ``--eval-texts``), the export's perplexity ratio, KL divergence and same-top-token rate
            against the Keras model on that many windows, through its ``serving_default`` forward pass
            (:func:`tfaccel.generation.quality.validate_quality`; defaults: ratio 1.01, KL 0.01).
    """

    name = "generate"
    consumes = "keras"
    produces = "saved_model"
    default_tolerance = Tolerance(max_abs_diff=1e-4, min_cosine=0.99999, max_accuracy_drop=0.0)

    def __init__(self, max_new_tokens_cap: int | None = None, prompt_buckets=DEFAULT_PROMPT_BUCKETS,
                 check_new_tokens: int = 8, min_token_agreement: float = 0.9, weights: str = "float",
                 jit_compile="auto", max_perplexity_ratio="default", max_kl="default", min_same_top=None,
                 quality_windows: int | None = None, **kwargs):
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}. Received: weights={weights!r}")
        if weights == "int8" and kwargs.get("tolerance") is None:
            from tfaccel.quantization.int8_step import INT8_TOLERANCE

            kwargs["tolerance"] = INT8_TOLERANCE
        super().__init__(**kwargs)
        from tfaccel.xla.generate_export import resolve_jit_compile

        resolve_jit_compile(jit_compile)  # validates
        self.jit_compile = jit_compile
        if max_new_tokens_cap is not None and (isinstance(max_new_tokens_cap, bool) or int(max_new_tokens_cap) < 1):
            raise ValueError(f"max_new_tokens_cap must be a positive int or None. Received: "
                             f"max_new_tokens_cap={max_new_tokens_cap!r}")
        self.max_new_tokens_cap = None if max_new_tokens_cap is None else int(max_new_tokens_cap)
        self.prompt_buckets = tuple(prompt_buckets)
        self.check_new_tokens = int(check_new_tokens)
        if not 0.0 <= min_token_agreement <= 1.0:
            raise ValueError(f"min_token_agreement must be in [0, 1]. Received: min_token_agreement={min_token_agreement}")
        self.min_token_agreement = float(min_token_agreement)
        self.weights = weights
        self.summary = None
        from tfaccel.generation.quality import quality_budget

        self.quality_budget, self.quality_windows = quality_budget(max_perplexity_ratio, max_kl, min_same_top,
                                                                   quality_windows)

    def params(self):
        p = {"max_new_tokens_cap": self.max_new_tokens_cap, "prompt_buckets": list(self.prompt_buckets),
             "jit_compile": self.jit_compile, "weights": self.weights,
             "signatures": ["serving_default", "generate", "generate_greedy"], **self.quality_budget.to_dict(),
             "quality_windows": self.quality_windows}
        if self.summary is not None:
            p["weight_bytes_before"] = self.summary.weight_bytes_before
            p["weight_bytes_after"] = self.summary.weight_bytes_after
        return p

    def check(self, source) -> None:
        """Plan-time: the source is a CausalLM of a supported family and the cap fits its length."""
        from tfaccel.causal_lm_spec import causal_lm_spec

        if source.task != "causal_lm" or source.model is None or not hasattr(source.model, "call_with_cache"):
            raise PlanError(f"Step 'generate' needs a keras-hub causal LM (GPT2CausalLM, LlamaCausalLM, ...); the "
                            f"source is a {source.task} model. Load one with --task causal_lm or use 'export'.")
        spec = causal_lm_spec(source.model)
        if spec.refusal:
            raise PlanError(f"Step 'generate' cannot export {spec.class_name}: {spec.refusal}")
        resolve_generate_limits(spec, self.max_new_tokens_cap, self.prompt_buckets)

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        import tensorflow as tf

        if ctx.source.task != "causal_lm" or not hasattr(artifact.model, "call_with_cache"):
            raise StepError(f"Step 'generate' needs a keras-hub causal LM (GPT2CausalLM, LlamaCausalLM, ...); the "
                            f"source is a {ctx.source.task} model. Load one with --task causal_lm or use 'export'.")
        model = artifact.model
        if self.weights == "int8":
            from tfaccel.quantization.keras_quantize import quantize_model

            ctx.log("  Keras int8 quantization of a copy")
            model, self.summary = quantize_model(artifact.model, "int8", copy=True)
            for line in self.summary.notes():
                ctx.note(line)
        ctx.log("  writing SavedModel with generate / generate_greedy signatures (decode loop with KV cache)")
        info = write_generate_saved_model(model, ctx.stage_dir, max_new_tokens_cap=self.max_new_tokens_cap,
                                          prompt_buckets=self.prompt_buckets, jit_compile=self.jit_compile)
        ctx.note(f"{info['family']}: max_new_tokens_cap {info['max_new_tokens_cap']}, prompt buckets "
                 f"{info['prompt_buckets']}, decode loop "
                 f"{'XLA-compiled' if info['jit_compile'] else 'in graph mode (XLA off: slower on CPUs here)'}")
        x = ctx.source.sample_inputs
        ids, mask = x["token_ids"][:4], x["padding_mask"][:4].astype("int32")
        width = int(mask.sum(1).max())  # drop all-padding columns: prompts must fit a bucket
        ids, mask = ids[:, :width], mask[:, :width]
        n = min(self.check_new_tokens, info["max_new_tokens_cap"])
        want = keras_hub_greedy(artifact.model, ids, mask, n)
        loaded = tf.saved_model.load(str(ctx.stage_dir))
        got = loaded.signatures["generate_greedy"](
            token_ids=tf.constant(ids), padding_mask=tf.constant(mask), max_new_tokens=tf.constant(n),
            stop_token_id=tf.constant(-1))["token_ids"].numpy()
        agreement = token_agreement(got, want, mask, n)
        ref = "keras-hub generate of the float model" if self.weights == "int8" else "keras-hub generate"
        ctx.note(f"greedy generate_greedy vs {ref} on {len(ids)} sample prompts x {n} new tokens: "
                 f"{agreement:.1%} of tokens agree")
        checked, what = agreement, "new tokens"
        if self.weights == "int8":
            # Free-running tokens compound: after one flipped argmax a row continues from another prefix.
            # What int8 weights change is each step's choice, so the gate is the next-token agreement on
            # keras-hub's float tokens (teacher-forced through the SavedModel's serving_default).
            checked, what = next_token_agreement(loaded.signatures["serving_default"], want, mask, n), "next tokens"
            ctx.note(f"int8 next-token agreement on keras-hub's float tokens (teacher-forced): {checked:.1%}")
        if checked < self.min_token_agreement:
            raise StepError(f"The generate export disagrees with {ref} on {1 - checked:.1%} of {what} (allowed "
                            f"{1 - self.min_token_agreement:.0%}; min_token_agreement={self.min_token_agreement}).")
        from tfaccel.generation.quality import validate_quality

        serving = loaded.signatures["serving_default"]

        def forward(ids):
            out = serving(token_ids=tf.constant(ids), padding_mask=tf.constant(np.ones_like(ids)))
            return np.asarray(next(iter(out.values())), np.float32)

        quality = validate_quality(ctx, forward, self.quality_budget, self.name, windows=self.quality_windows,
                                   what="generate SavedModel", through="its serving_default forward pass")
        out_info = {**info, "token_agreement": agreement, "weights": self.weights}
        if quality is not None:
            out_info["quality"] = quality
        if self.weights == "int8":
            out_info["next_token_agreement"] = checked
        if self.summary is not None:
            out_info["quantization"] = self.summary.to_dict()
        return Artifact(kind="saved_model", path=str(ctx.stage_dir), input_names=artifact.input_names,
                        info=out_info, loaded=loaded)


def token_agreement(got, want, padding_mask, max_new_tokens: int) -> float:
    """The share of the ``max_new_tokens`` new tokens after each row's prompt that are equal."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        raise StepError(f"generate returned token_ids of shape {got.shape}; keras-hub's generate gave {want.shape}.")
    lengths = np.asarray(padding_mask).sum(1)[:, None]
    positions = np.arange(want.shape[1])[None, :]
    new = (positions >= lengths) & (positions < lengths + max_new_tokens)
    return float(np.mean(got[new] == want[new])) if new.any() else 1.0


def next_token_agreement(serving_fn, want, padding_mask, max_new_tokens: int) -> float:
    """Teacher-forced: the share of ``want``'s new tokens that are the argmax of ``serving_fn``'s logits
    at the position before them, given ``want``'s own prefix."""
    import tensorflow as tf

    want = np.asarray(want)
    lengths = np.asarray(padding_mask).sum(1)[:, None]
    positions = np.arange(want.shape[1])[None, :]
    out = serving_fn(token_ids=tf.constant(want, tf.int32),
                     padding_mask=tf.constant((positions < lengths + max_new_tokens).astype("int32")))
    logits = np.asarray(next(iter(out.values())))
    pred = np.argmax(logits[:, :-1], axis=-1)
    new = ((positions >= lengths) & (positions < lengths + max_new_tokens))[:, 1:]
    return float(np.mean(pred[new] == want[:, 1:][new])) if new.any() else 1.0
