"""ONNX KV-cache decoder -> TensorRT engine (fp16 or fp32), and the `tensorrt-decoder` step.

The engine is built by :func:`tfaccel.tensorrt.build_engine` (the same builder as the `tensorrt` step:
TensorRT 10 builder flags or TensorRT 11's fp16-typed ONNX), with one optimization profile over
batch, new tokens and past length (:class:`DecoderProfile`). The folder holds ``decoder.engine`` and the
decoder's ``decoder.json``; :class:`tfaccel.generation.TrtDecoderGenerator` runs it.

Needs an NVIDIA GPU and ``pip install 'tfaccel[trt]'``; without them the step fails before any work with
the same message as the `tensorrt` step. Its tests carry the ``gpu`` marker.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from tfaccel.core.artifact import Artifact
from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.errors import StepError
from tfaccel.generation.generators import TRT_DECODER_FILE


@dataclasses.dataclass(frozen=True)
class DecoderProfile:
    """Shape ranges of a decoder engine: (min, opt, max) batch, new tokens per call and total length.

    ``past`` runs from 0 (prefill) to ``length[2] - 1``; the attention mask covers past + new. TensorRT's
    builder asks for each input's shapes in the ONNX input order, which ``input_order`` records.

    Example:
        >>> p = DecoderProfile(batch=(1, 1, 8), new=(1, 1, 64), length=(1, 96, 128),
        ...                    input_order=("attention_mask", "input_ids", "past_0"))
        >>> p.shapes_for("past_0", (-1, 2, -1, 4, 16))
        ((1, 2, 0, 4, 16), (1, 2, 95, 4, 16), (8, 2, 127, 4, 16))
    """

    batch: tuple[int, int, int]
    new: tuple[int, int, int]
    length: tuple[int, int, int]
    input_order: tuple[str, ...] = ()
    _calls: list = dataclasses.field(default_factory=list, compare=False, repr=False)

    def __post_init__(self):
        for name in ("batch", "new", "length"):
            v = getattr(self, name)
            if len(v) != 3 or not 1 <= v[0] <= v[1] <= v[2]:
                raise ValueError(f"DecoderProfile.{name} must be (min, opt, max) with 1 <= min <= opt <= max. "
                                 f"Received: {name}={v!r}")

    def shapes_for(self, name: str, dims) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shapes of input ``name`` with ONNX dims ``dims`` (negative: dynamic)."""
        b, n, t = self.batch, self.new, self.length
        if name == "input_ids":
            ranges = [b, n]
        elif name == "attention_mask":
            ranges = [b, t]
        elif name.startswith("past_"):
            past = (0, max(t[1] - n[1], 0), t[2] - 1)
            ranges = [b, None, past, None, None]
        else:
            raise StepError(f"DecoderProfile: unknown decoder input {name!r}.")
        out = [[], [], []]
        for d, r in zip(dims, ranges, strict=True):
            for k in range(3):
                out[k].append(int(d) if r is None or (d is not None and d >= 0) else r[k])
        return tuple(tuple(s) for s in out)

    def shapes(self, dims):
        """What :func:`tfaccel.tensorrt.build_engine` calls, once per input in network (ONNX) order."""
        name = self.input_order[len(self._calls) % len(self.input_order)]
        self._calls.append(name)
        return self.shapes_for(name, dims)

    def describe(self) -> str:
        return (f"batch {self.batch[0]}..{self.batch[2]}, new tokens {self.new[0]}..{self.new[2]}, "
                f"length {self.length[0]}..{self.length[2]}")

    def get_config(self) -> dict[str, Any]:
        return {"batch": list(self.batch), "new": list(self.new), "length": list(self.length)}


def build_decoder_engine(src_folder: str | os.PathLike, dst_folder: str | os.PathLike, *, precision: str = "fp16",
                         max_batch: int = 8, max_prompt: int = 128, max_length: int = 256,
                         opt_batch: int = 1, log=None) -> dict:
    """Build ``dst_folder/decoder.engine`` from an ONNX decoder folder and copy its ``decoder.json``.

    Raises:
        MissingDependencyError / StepError: no ``tensorrt``, no GPU, or the build failed (as the
            ``tensorrt`` step reports it).
    """
    import onnx

    from tfaccel.onnx.decoder_export import read_layout, write_layout
    from tfaccel.tensorrt.engine_build import build_engine
    from tfaccel.tensorrt.trt_config import TensorRTConfig

    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be 'fp16' or 'fp32' for a decoder engine. Received: precision={precision!r}")
    layout, info = read_layout(src_folder)
    if layout.cache != "stacked":
        raise StepError("TensorRT cannot parse the native decoder graph (onnxruntime's contrib operators: "
                        "GroupQueryAttention, MatMulNBits, ...). Build the ONNX decoder from keras-hub's layers: "
                        "--set onnx-decoder.graph=keras-layers.")
    if layout.max_length is not None:
        max_length = min(max_length, layout.max_length)
    max_prompt = min(max_prompt, max_length)
    onnx_path = Path(src_folder) / info.get("onnx_file", "decoder.onnx")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    order = tuple(i.name for i in graph.input if i.name not in inits)
    profile = DecoderProfile(batch=(1, min(opt_batch, max_batch), max_batch), new=(1, 1, max_prompt),
                             length=(1, min(96, max_length), max_length), input_order=order)
    dst = Path(dst_folder)
    dst.mkdir(parents=True, exist_ok=True)
    engine_info = build_engine(onnx_path, dst / TRT_DECODER_FILE, TensorRTConfig(precision), profiles=[profile],
                               log=log)
    carried = {k: v for k, v in info.items() if k not in layout.to_dict() and k != "onnx_file"}
    write_layout(dst, layout, **carried, tensorrt=engine_info.get("tensorrt"), precision=precision,
                 profile=profile.get_config())
    return engine_info


class TensorRTDecoderStep(Step):
    """ONNX decoder -> TensorRT decoder engine (fp16 by default), checked against keras-hub greedy.

    Args:
        precision: "fp16" (default) or "fp32".
        max_batch, max_prompt, max_length: the engine's profile limits (batch, tokens per call, total
            length; the model's own maximum length caps the last).
        check_new_tokens: new tokens per sample prompt for the greedy check against keras-hub.
        min_next_token_cosine: lowest next-token logits cosine allowed (default 0.999, fp16's ~3 digits).
        min_token_agreement: lowest teacher-forced next-token agreement (default None: reported only; fp16
            flips near-tied logits of random-weight models).
    """

    name = "tensorrt-decoder"
    consumes = "onnx_decoder"
    produces = "tensorrt_decoder"
    side_artifact = True
    # fp16 keeps ~3 significant digits (as for the tensorrt step)
    default_tolerance = Tolerance(max_abs_diff=None, min_cosine=0.999, max_accuracy_drop=None)

    def __init__(self, precision: str = "fp16", max_batch: int = 8, max_prompt: int = 128, max_length: int = 256,
                 check_new_tokens: int = 8, min_next_token_cosine: float = 0.999,
                 min_token_agreement: float | None = None, **kwargs):
        super().__init__(**kwargs)
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be 'fp16' or 'fp32'. Received: precision={precision!r}")
        for name, v in (("max_batch", max_batch), ("max_prompt", max_prompt), ("max_length", max_length)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1. Received: {name}={v!r}")
        if min_token_agreement is not None and not 0.0 <= min_token_agreement <= 1.0:
            raise ValueError(f"min_token_agreement must be in [0, 1] or None. Received: "
                             f"min_token_agreement={min_token_agreement!r}")
        if not -1.0 <= min_next_token_cosine <= 1.0:
            raise ValueError(f"min_next_token_cosine must be in [-1, 1]. Received: "
                             f"min_next_token_cosine={min_next_token_cosine!r}")
        self.precision, self.max_batch, self.max_prompt, self.max_length = precision, max_batch, max_prompt, max_length
        self.check_new_tokens, self.min_next_token_cosine = int(check_new_tokens), float(min_next_token_cosine)
        self.min_token_agreement = None if min_token_agreement is None else float(min_token_agreement)

    def params(self):
        return {"precision": self.precision, "max_batch": self.max_batch, "max_prompt": self.max_prompt,
                "max_length": self.max_length, "check_new_tokens": self.check_new_tokens,
                "min_next_token_cosine": self.min_next_token_cosine, "min_token_agreement": self.min_token_agreement}

    def check(self, source):
        """Fails before any work where TensorRT cannot run (no ``tensorrt`` / ``cuda-python``, no GPU)."""
        from tfaccel.tensorrt.availability import import_cudart, import_tensorrt, require_gpu

        import_tensorrt()
        import_cudart()
        require_gpu("The tensorrt-decoder step")
        if source.task != "causal_lm" or source.kind != "keras":
            raise StepError("Step 'tensorrt-decoder' needs a keras-hub causal LM source (for the greedy check).")

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        from tfaccel.generation.agreement import decoder_agreement
        from tfaccel.generation.generators import TrtDecoderGenerator

        self.check(ctx.source)
        info = build_decoder_engine(artifact.path, ctx.stage_dir, precision=self.precision, max_batch=self.max_batch,
                                    max_prompt=self.max_prompt, max_length=self.max_length, log=ctx.log)
        ctx.note(f"engine built with TensorRT {info['tensorrt']} ({self.precision}); it runs only with that TensorRT "
                 "version on the same GPU model")
        x = ctx.source.sample_inputs
        ids, mask = x["token_ids"][:4].astype("int32"), x["padding_mask"][:4].astype("int32")
        res = decoder_agreement(ctx.source.model, TrtDecoderGenerator(ctx.stage_dir), ids, mask,
                                self.check_new_tokens)
        ctx.note(f"greedy vs keras-hub generate: {res['token_agreement']:.1%} of tokens the same, next-token argmax "
                 f"{res['next_token_agreement']:.1%}, next-token logits cosine min {res['next_token_cosine_min']:.5f}")
        if res["next_token_cosine_min"] < self.min_next_token_cosine:
            raise StepError(f"Step 'tensorrt-decoder': next-token logits cosine {res['next_token_cosine_min']:.5f} < "
                            f"{self.min_next_token_cosine}. Try precision='fp32'.")
        if self.min_token_agreement is not None and res["next_token_agreement"] < self.min_token_agreement:
            raise StepError(f"Step 'tensorrt-decoder': next tokens differ from keras-hub's on "
                            f"{1 - res['next_token_agreement']:.1%} of positions (allowed "
                            f"{1 - self.min_token_agreement:.1%}). Try precision='fp32'.")
        return Artifact(kind="tensorrt_decoder", path=str(ctx.stage_dir), input_names=artifact.input_names,
                        info={**info, **res})

