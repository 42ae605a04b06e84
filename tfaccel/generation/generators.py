"""Generators for tfaccel's generation artifacts, and :func:`load_generator`, which tells them apart.

- a SavedModel from the ``generate`` step: its ``generate_greedy`` signature (the loop runs inside it);
- an ONNX decoder folder (``onnx-decoder``, ``ort-decoder-int8``, ``ort-decoder-int4``): onnxruntime runs
  one decode step per token, the cache stays in onnxruntime's buffers between steps;
- a TensorRT decoder folder (``tensorrt-decoder``): the same loop over a TensorRT engine on the GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tfaccel.core.artifact import register_kind
from tfaccel.core.files import read_json_file
from tfaccel.errors import InputMismatchError, SourceError
from tfaccel.generation.greedy_loop import GenerationResult, greedy_generate
from tfaccel.generation.prompts import check_stop_token_id, prepare_prompts

TRT_DECODER_FILE = "decoder.engine"


class Generator:
    """Greedy generation from one artifact: ``generate(prompt_ids, max_new_tokens, stop_token_id)``.

    Attributes:
        kind: "saved_model", "onnx_decoder" or "tensorrt_decoder".
        vocabulary_size, max_length: limits prompts are checked against (None: unknown / unbounded).
    """

    kind = ""
    vocabulary_size: int | None = None
    max_length: int | None = None

    def generate(self, prompt_ids, max_new_tokens: int = 16, stop_token_id: int = -1,
                 padding_mask=None) -> GenerationResult:
        """Greedy tokens after each prompt (see :func:`tfaccel.generation.generate`)."""
        check_stop_token_id(stop_token_id, self.vocabulary_size)
        ids, mask = prepare_prompts(prompt_ids, padding_mask, vocabulary_size=self.vocabulary_size,
                                    max_length=self.max_length, max_new_tokens=max_new_tokens)
        return self._generate(ids, mask, int(max_new_tokens), int(stop_token_id))

    def _generate(self, ids, mask, max_new_tokens, stop_token_id) -> GenerationResult:
        raise NotImplementedError


class SavedModelGenerator(Generator):
    """The ``generate_greedy`` signature of a SavedModel written by the ``generate`` step."""

    kind = "saved_model"

    def __init__(self, path: str | os.PathLike):
        import tensorflow as tf

        self._tf = tf
        self.path = str(path)
        self._loaded = tf.saved_model.load(self.path)
        if "generate_greedy" not in self._loaded.signatures:
            raise SourceError(f"The SavedModel {self.path} has no generate_greedy signature (it has "
                              f"{sorted(self._loaded.signatures)}). Write one with the 'generate' step.")
        self._fn = self._loaded.signatures["generate_greedy"]
        self.vocabulary_size = vocabulary_size_of(self.path)

    def _generate(self, ids, mask, max_new_tokens, stop_token_id):
        tf = self._tf
        try:
            out = self._fn(token_ids=tf.constant(ids), padding_mask=tf.constant(mask),
                           max_new_tokens=tf.constant(max_new_tokens), stop_token_id=tf.constant(stop_token_id))
        except tf.errors.InvalidArgumentError as exc:
            # the export's bucket assertion, or the padding to the largest bucket failing first in graph mode
            if "prompt bucket" in str(exc) or "Paddings must be non-negative" in str(exc):
                raise InputMismatchError(
                    f"The prompt ({ids.shape[1]} tokens) is longer than the largest prompt bucket of {self.path}. "
                    "Shorten it, or rebuild with a larger bucket (--set generate.prompt_buckets=...).") from exc
            # the export's vocabulary assertions, or an embedding lookup out of range in older exports
            if "(the vocabulary)" in str(exc) or "stop_token_id must be" in str(exc) or "is not in [0, " in str(exc):
                raise InputMismatchError(f"A token id is outside the vocabulary of {self.path}: "
                                         f"{str(exc).strip().splitlines()[0]}. Give ids from the model's tokenizer.") from exc
            raise
        tokens, lengths = out["token_ids"].numpy(), out["lengths"].numpy()
        if tokens.shape[1] < ids.shape[1] + max_new_tokens:
            raise InputMismatchError(
                f"{self.path} generates at most {tokens.shape[1] - ids.shape[1]} new tokens (its max_new_tokens_cap). "
                f"Received: max_new_tokens={max_new_tokens}. Ask for fewer or rebuild with a larger cap.")
        return GenerationResult(token_ids=tokens, lengths=lengths)

    def logits(self, token_ids: np.ndarray, padding_mask: np.ndarray) -> np.ndarray:
        """The forward pass of the same weights (``serving_default``): logits ``[batch, seq, vocab]``.

        The ``generate_greedy`` loop cannot be stepped from outside; its cached steps compute this
        arithmetic (Keras int8 weights quantize activations per token, so one pass equals the steps)."""
        tf = self._tf
        serving = self._loaded.signatures.get("serving_default")
        if serving is None:
            raise SourceError(f"The SavedModel {self.path} has no serving_default signature to score text with.")
        out = serving(token_ids=tf.constant(np.asarray(token_ids, np.int32)),
                      padding_mask=tf.constant(np.asarray(padding_mask, np.int32)))
        return np.asarray(out["logits"] if "logits" in out else next(iter(out.values())), np.float32)


class _CacheDecoder(Generator):
    """The greedy loop over a decoder step with ``past_i`` inputs and ``present_i`` outputs."""

    def __init__(self, folder: str | os.PathLike):
        from tfaccel.onnx.decoder_export import read_layout

        self.path = str(folder)
        self.layout, self.info = read_layout(folder)
        self.vocabulary_size = self.layout.vocabulary_size
        self.max_length = self.layout.max_length
        self._cache_dtype = np.dtype(self.layout.dtype if self.layout.dtype != "bfloat16" else "float32")

    def _empty_past(self, batch: int):
        lay = self.layout
        return {n: np.zeros(lay.past_shape(batch), self._cache_dtype) for n in lay.past_names()}

    def _new_state(self, batch: int, capacity: int) -> dict:
        """The cache state of one generation of at most ``capacity`` positions."""
        return {"past": self._empty_past(batch), "past_len": 0}

    def _generate(self, ids, mask, max_new_tokens, stop_token_id):
        state = {}

        def prefill(x):
            state.clear()
            state.update(self._new_state(x.shape[0], ids.shape[1] + max_new_tokens))
            return self._step(x, state)

        def decode(x):
            return self._step(x, state)

        return greedy_generate(prefill, decode, ids, mask, max_new_tokens, stop_token_id)

    def _step(self, x, state):
        raise NotImplementedError

    def stepwise_logits(self, token_ids: np.ndarray, start: int) -> np.ndarray:
        """Teacher-forced logits the way greedy decoding computes them: prefill ``token_ids[:, :start]``,
        then one decode step per position, each fed the given token instead of the decoder's own.

        A dynamic-int8 decoder quantizes each call's activations with one scale, so a whole-sequence
        forward pass (:meth:`logits`) is coarser than decoding one token at a time; this is the measure
        of what decoding picks.

        Returns:
            ``[batch, width, vocab]`` float32: at position ``p >= start - 1`` the logits that predict
            token ``p + 1``; zeros before ``start - 1``.
        """
        ids = np.ascontiguousarray(token_ids, dtype=np.int32)
        batch, width = ids.shape
        if not 1 <= start <= width:
            raise InputMismatchError(f"start must be in [1, {width}] for token_ids of width {width}. Received: start={start}")
        state = self._new_state(batch, width)
        first = self._step(ids[:, :start], state)
        out = np.zeros((batch, width, first.shape[-1]), np.float32)
        out[:, start - 1] = first
        for p in range(start, width - 1):
            out[:, p] = self._step(ids[:, p: p + 1], state)
        return out

    def logits(self, token_ids: np.ndarray, padding_mask: np.ndarray) -> np.ndarray:
        """The forward pass (no past): logits ``[batch, seq, vocab]`` with the padding mask applied."""
        raise NotImplementedError


class OnnxDecoderGenerator(_CacheDecoder):
    """An ONNX decoder folder (``decoder.onnx`` + ``decoder.json``) in onnxruntime on the CPU.

    A decode step is many small nodes around the weight MatMuls (gpt2-small: 200 in the native graph,
    ~2,100 traced through keras-hub's layers), so how onnxruntime's threads wait between them
    matters. By default they do not spin: on this project's shared 2-core machines (load 5-6 from other work,
    gpt2-small traced graph, 32 + 64 tokens, batch 1, 2026-12-01) spinning threads made the int8 decoder 1.7-2.0x slower (20 vs 34-38 tokens/s) and the
    fp32 one 1.5x slower (9.5 vs 14 tokens/s); one thread was faster still under that load (43-62
    tokens/s int8), two threads without spinning are the default because an idle machine has two cores
    for the MatMuls.

    Args:
        folder: the decoder folder.
        intra_op_threads: onnxruntime threads (0: all cores).
        spinning: let idle onnxruntime threads spin between nodes (onnxruntime's own default; fastest only
            when nothing else runs on the cores).

    Raises:
        InputMismatchError: ``intra_op_threads`` is not an int >= 0 or ``spinning`` not a bool.
    """

    kind = "onnx_decoder"

    def __init__(self, folder: str | os.PathLike, intra_op_threads: int = 0, spinning: bool = False):
        if isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, (int, np.integer)) \
                or intra_op_threads < 0:
            raise InputMismatchError(f"intra_op_threads must be an int >= 0 (0: all cores). Received: "
                                     f"intra_op_threads={intra_op_threads!r}")
        if not isinstance(spinning, bool):
            raise InputMismatchError(f"spinning must be True or False. Received: spinning={spinning!r}")
        super().__init__(folder)
        from tfaccel.compat import require
        from tfaccel.onnx.onnx_runner import ort_cpu_session

        self._ort = require("onnxruntime", purpose="running ONNX decoders")
        self.threading = {"intra_op_threads": int(intra_op_threads), "spinning": spinning}
        model = Path(folder) / self.info.get("onnx_file", "decoder.onnx")
        self.session = ort_cpu_session(model, intra_op_threads=int(intra_op_threads), spinning=spinning,
                                       purpose="running ONNX decoders")
        self._outputs = ["logits", *self.layout.present_names()]
        # native graphs take logits_from: logits of the last position only where a step needs no more
        self._last_only = "logits_from" in {i.name for i in self.session.get_inputs()}

    def _run(self, feed):
        ort = self._ort
        values = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}
        return self.session.run_with_ort_values(self._outputs, values)

    def _new_state(self, batch: int, capacity: int) -> dict:
        if self.layout.cache != "bnsh":
            return super()._new_state(batch, capacity)
        # The native graphs' attention writes new keys/values in place when past and present are one buffer:
        # one zeroed buffer per cache tensor for the whole generation, no copy of the cache per step.
        ort = self._ort
        shape = self.layout.past_shape(batch, capacity)
        return {"past_len": 0, "buffers": {n: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self._cache_dtype))
                                           for n in self.layout.past_names()}}

    def _last(self, x) -> dict:
        return {"logits_from": np.array([x.shape[1] - 1], np.int64)} if self._last_only else {}

    def _step_in_place(self, x, mask, state):
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", x)
        io.bind_cpu_input("attention_mask", mask)
        for name, value in self._last(x).items():
            io.bind_cpu_input(name, value)
        for past, present in zip(self.layout.past_names(), self.layout.present_names(), strict=True):
            io.bind_ortvalue_input(past, state["buffers"][past])
            io.bind_ortvalue_output(present, state["buffers"][past])
        io.bind_output("logits")
        self.session.run_with_iobinding(io)
        return io.get_outputs()[-1].numpy()

    def _step(self, x, state):
        past_len = state.get("past_len", 0)
        x = np.ascontiguousarray(x, dtype=np.int32)
        mask = np.ones((x.shape[0], past_len + x.shape[1]), np.int32)
        if "buffers" in state:
            state["past_len"] = past_len + x.shape[1]
            return self._step_in_place(x, mask, state)[:, -1, :]
        outs = self._run({"input_ids": x, "attention_mask": mask, **self._last(x), **state["past"]})
        state["past"] = dict(zip(self.layout.past_names(), outs[1:], strict=True))  # stays in onnxruntime's buffers
        state["past_len"] = past_len + x.shape[1]
        logits = outs[0].numpy()
        return logits[:, -1, :]

    def logits(self, token_ids, padding_mask):
        ids = np.asarray(token_ids, np.int32)
        every = {"logits_from": np.zeros(1, np.int64)} if self._last_only else {}
        outs = self._run({"input_ids": ids, "attention_mask": np.asarray(padding_mask, np.int32), **every,
                          **self._empty_past(ids.shape[0])})
        return outs[0].numpy()


class TrtDecoderGenerator(_CacheDecoder):
    """A TensorRT decoder folder (``decoder.engine`` + ``decoder.json``) on an NVIDIA GPU.

    The cache goes through the host between steps (:class:`tfaccel.tensorrt.TrtEngineRunner`'s numpy
    interface): correct, not the fastest a TensorRT decoder can be.
    """

    kind = "tensorrt_decoder"

    def __init__(self, folder: str | os.PathLike):
        super().__init__(folder)
        from tfaccel.tensorrt.engine_runner import TrtEngineRunner

        self.runner = TrtEngineRunner(Path(folder) / TRT_DECODER_FILE)
        dtypes = self.runner.input_dtypes
        self._cache_dtype = dtypes.get(self.layout.past_names()[0], self._cache_dtype)

    def _step(self, x, state):
        past = state["past"]
        past_len = past[self.layout.past_names()[0]].shape[self.layout.past_axis]
        mask = np.ones((x.shape[0], past_len + x.shape[1]), np.int32)
        outs = self.runner({"input_ids": np.asarray(x, np.int32), "attention_mask": mask, **past})
        state["past"] = {p: outs[q] for p, q in zip(self.layout.past_names(), self.layout.present_names(), strict=True)}
        return outs["logits"][:, -1, :].astype(np.float32)

    def logits(self, token_ids, padding_mask):
        ids = np.asarray(token_ids, np.int32)
        outs = self.runner({"input_ids": ids, "attention_mask": np.asarray(padding_mask, np.int32),
                            **self._empty_past(ids.shape[0])})
        return outs["logits"].astype(np.float32)


def artifact_kind(path: str | os.PathLike) -> str:
    """Which generation artifact ``path`` is: "saved_model", "onnx_decoder" or "tensorrt_decoder".

    Raises:
        SourceError: the path does not exist or is not a generation artifact.
    """
    from tfaccel.onnx.decoder_export import LAYOUT_FILE

    p = Path(path)
    if not p.exists():
        raise SourceError(f"{str(p)!r} does not exist. Give a generation artifact: a SavedModel from the 'generate' "
                          "step or a decoder folder from 'onnx-decoder', 'ort-decoder-int8/int4' or 'tensorrt-decoder'.")
    if p.is_file() and p.name in (LAYOUT_FILE, "decoder.onnx", TRT_DECODER_FILE):
        p = p.parent
    if (p / LAYOUT_FILE).is_file():
        info = read_json_file(p / LAYOUT_FILE, "the decoder layout")
        if (p / TRT_DECODER_FILE).is_file():
            return "tensorrt_decoder"
        if (p / info.get("onnx_file", "decoder.onnx")).is_file():
            return "onnx_decoder"
    if (p / "saved_model.pb").is_file():
        return "saved_model"
    raise SourceError(f"{str(p)!r} is not a tfaccel generation artifact: expected a SavedModel with a generate_greedy "
                      "signature (the 'generate' step) or a decoder folder with decoder.json (the 'onnx-decoder', "
                      "'ort-decoder-int8', 'ort-decoder-int4' or 'tensorrt-decoder' steps).")


def vocabulary_size_of(path: str | os.PathLike) -> int | None:
    """The vocabulary size a generation artifact records, read without loading it: a decoder folder's
    decoder.json, or a generate SavedModel's ``assets.extra/tfaccel_generate.json`` (None for exports made
    before it was written). Lets a caller check token ids before paying for the load.

    Example:
        >>> vocabulary_size_of("out/stages/01-generate")  # doctest: +SKIP
        50257
    """
    from tfaccel.onnx.decoder_export import LAYOUT_FILE
    from tfaccel.xla.generate_export import GENERATE_INFO_FILE

    p = Path(path)
    p = p.parent if p.is_file() else p
    for name, what in ((LAYOUT_FILE, "the decoder layout"), (GENERATE_INFO_FILE, "the generate export's limits")):
        if (p / name).is_file():
            return read_json_file(p / name, what).get("vocabulary_size")
    return None


def load_generator(path: str | os.PathLike, **kwargs) -> Generator:
    """The generator for a generation artifact (see :func:`artifact_kind`).

    Args:
        path: a generate SavedModel, or an ONNX / TensorRT decoder folder (or its .onnx / .plan file).
        **kwargs: for an ONNX decoder, :class:`OnnxDecoderGenerator`'s ``intra_op_threads`` and ``spinning``.

    Raises:
        InputMismatchError: options given for an artifact that is not an ONNX decoder.

    Example:
        >>> gen = load_generator("out/stages/02-onnx-decoder")  # doctest: +SKIP
        >>> gen.generate([[464, 3290]], max_new_tokens=8).token_ids.shape  # doctest: +SKIP
        (1, 10)
    """
    kind = artifact_kind(path)
    p = Path(path)
    if p.is_file():
        p = p.parent
    if kwargs and kind != "onnx_decoder":
        raise InputMismatchError(
            f"{', '.join(sorted(kwargs))} only apply to an ONNX decoder (onnxruntime's threads); {path} is a "
            f"{kind}. Drop the option(s), or pass a folder from onnx-decoder / ort-decoder-int8 / ort-decoder-int4.")
    if kind == "saved_model":
        return SavedModelGenerator(p)
    if kind == "tensorrt_decoder":
        return TrtDecoderGenerator(p)
    return OnnxDecoderGenerator(p, **kwargs)


def generate(artifact_path: str | os.PathLike, prompt_ids, max_new_tokens: int = 16,
             stop_token_id: int = -1, padding_mask=None) -> GenerationResult:
    """Greedy generation with any tfaccel generation artifact.

    Args:
        artifact_path: a SavedModel from ``generate``, or a decoder folder from ``onnx-decoder``,
            ``ort-decoder-int8``, ``ort-decoder-int4`` or ``tensorrt-decoder``.
        prompt_ids: one prompt (list of ints), several (list of lists) or a right-padded 2-D array.
        max_new_tokens: tokens to add after each prompt.
        stop_token_id: a row ends after emitting this id (-1: never).
        padding_mask: for a 2-D ``prompt_ids``: 1 on real tokens.

    Returns:
        :class:`GenerationResult`: ``token_ids [batch, width + max_new_tokens]`` and ``lengths``.

    Raises:
        SourceError: the path is not a generation artifact.
        InputMismatchError: bad prompts (empty, non-integer, outside the vocabulary, too long).

    Example:
        >>> generate("out/stages/02-onnx-decoder", [1, 2, 3], max_new_tokens=4).token_ids  # doctest: +SKIP
        array([[1, 2, 3, 17, 17, 4, 9]], dtype=int32)
    """
    return load_generator(artifact_path).generate(prompt_ids, max_new_tokens, stop_token_id, padding_mask)


class DecoderLogitsRunner:
    """A decoder folder as a pipeline runner: ``{token_ids, padding_mask}`` in, the prefill logits out
    under the Keras model's output name (``output_name`` in ``decoder.json``), so the pipeline compares
    and times it like every other artifact."""

    def __init__(self, path: str | os.PathLike):
        self.generator = load_generator(path)
        if not isinstance(self.generator, _CacheDecoder):
            raise SourceError(f"{path} is not a decoder folder (decoder.json + decoder.onnx / decoder.engine).")
        self.output_name = self.generator.info.get("output_name", "logits")

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(inputs["token_ids"], np.int32)
        mask = np.asarray(inputs.get("padding_mask", np.ones_like(ids)), np.int32)
        return {self.output_name: self.generator.logits(ids, mask)}


register_kind("onnx_decoder", "ONNX KV-cache decoder", lambda a: DecoderLogitsRunner(a.path))
register_kind("tensorrt_decoder", "TensorRT KV-cache decoder", lambda a: DecoderLogitsRunner(a.path))
