"""Issue 21's OpenVINO lever, measured: is OpenVINO a faster runtime than onnxruntime for tfaccel's gpt2-small
decoders? Not a tfaccel format (it was not faster here; benchmarks/RESULTS.md has the figures); kept so the
question can be asked again of a newer OpenVINO.

Contenders, each a whole greedy generation (32 prompt + 64 new tokens of gpt2-small, random weights), timed
interleaved by tfaccel's one timer at batch 1 and batch 8:

* ``ort fp32`` and ``ort int8``: tfaccel's ``onnx-decoder`` (native graph) and ``ort-decoder-int8`` (8-bit
  weights in blocks of 64, ``MatMulNBits`` with int8 dot products), in onnxruntime, as ``tfaccel generate`` runs
  them (the cache written in place).
* ``ov fp32 (traced)``, ``ov int8 (traced)``: the traced decoder graph (``onnx-decoder graph=keras-layers``,
  standard ONNX ops) read by OpenVINO; int8 is per-output-channel symmetric int8 weights as OpenVINO's
  decompression pattern (Constant i8 -> Convert -> Multiply), which OpenVINO's CPU plugin runs as an i8
  ``FullyConnected`` with its activations quantized dynamically (groups of 32): llama.cpp's Q8_0 idea.
* ``ov int8 (native)``: the same weights on tfaccel's native graph, which OpenVINO reads with its own
  ``GroupQueryAttention``; OpenVINO 2026.4 runs that only at batch 1 (at batch 2 and more a Reshape in its
  decomposition fails), so it has no batch-8 row.

The weights are compressed here, not by ``nncf.compress_weights``: NNCF 3.4 refuses both graphs ("NNCF is not yet
supported OpenVINO data type: dynamic", the empty optional inputs of the attention op). Each OpenVINO row feeds the
cache back each step (OpenVINO has no in-place binding of an input to an output); a stateful model
(``ov.pass.MakeStateful``) would spare that copy, which is a few MB per step here.

The quality column is the next-token logits cosine against the ``ort fp32`` decoder (which matches keras-hub to
2e-6), teacher-forced over 4 prompts of 32 + 32 tokens, one prompt at a time.

    .venv/bin/python benchmarks/openvino_decoder_probe.py [--runs 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from tfaccel.generation.generators import _CacheDecoder  # light: no TensorFlow at import

PROMPT, NEW = 32, 64


def compress_int8(model):
    """Every MatMul on a float Constant -> symmetric int8 weights, one scale per output channel, in OpenVINO's
    decompression pattern (the tied embedding's head gets its own int8 copy; the lookup keeps the float table)."""
    import openvino as ov
    import openvino.opset13 as ops

    done: dict[str, object] = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() != "MatMul" or node.input_value(1).get_node().get_type_name() != "Constant":
            continue
        const = node.input_value(1).get_node()
        key = const.get_friendly_name()
        if key not in done:
            w = const.get_data().astype(np.float32)
            w = w if node.get_transpose_b() else w.T  # [N, K]
            scale = np.abs(w).max(-1, keepdims=True) / 127.0
            scale[scale == 0] = 1.0
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            done[key] = ops.multiply(ops.convert(ops.constant(q), ov.Type.f32), ops.constant(scale.astype(np.float32)))
        new = ops.matmul(node.input_value(0), done[key], node.get_transpose_a(), True)
        for target in node.output(0).get_target_inputs():
            target.replace_source_output(new.output(0))
        new.output(0).get_tensor().set_names(node.output(0).get_tensor().get_names())
    model.validate_nodes_and_infer_types()
    return model


class OpenVINODecoder(_CacheDecoder):
    """A tfaccel decoder folder's graph (``model``: read and perhaps compressed by the caller) compiled by OpenVINO,
    as a tfaccel Generator: the package's greedy loop and teacher-forced logits around OpenVINO's decode step."""

    kind = "openvino_decoder"

    def __init__(self, folder, model, native: bool):
        import openvino as ov

        super().__init__(folder)
        self.native = native
        self.request = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"}).create_infer_request()

    def _step(self, x, state):  # the cache is fed back each step: OpenVINO has no in-place binding
        x = np.ascontiguousarray(x, dtype=np.int32)
        feed = {"input_ids": x, "attention_mask": np.ones((x.shape[0], state["past_len"] + x.shape[1]), np.int32),
                **state["past"]}
        if self.native:
            feed["logits_from"] = np.array([x.shape[1] - 1], np.int64)
        out = self.request.infer(feed)
        state["past"] = {n: out[n.replace("past_", "present_", 1)] for n in state["past"]}
        state["past_len"] += x.shape[1]
        return out["logits"][:, -1]


def _build(work: Path) -> dict[str, Path]:
    from tfaccel import Pipeline, load_source
    from tfaccel.onnx.decoder_steps import OnnxDecoderStep, OrtDecoderInt8Step

    folders = {"native": work / "native", "traced": work / "traced"}
    source = load_source("gpt2-small", progress=print)
    if not (folders["native"] / "report.json").exists():
        Pipeline([OnnxDecoderStep(), OrtDecoderInt8Step()], measure=False, log=print).run(source, folders["native"])
    if not (folders["traced"] / "report.json").exists():
        Pipeline([OnnxDecoderStep(graph="keras-layers")], measure=False, log=print).run(source, folders["traced"])
    return {"ort fp32": folders["native"] / "stages/01-onnx-decoder",
            "ort int8": folders["native"] / "stages/02-ort-decoder-int8",
            "traced": folders["traced"] / "stages/01-onnx-decoder"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed generations per contender and batch")
    parser.add_argument("--work", help="folder for the decoders (reused when they are there; default: a temp dir)")
    args = parser.parse_args(argv)
    import openvino as ov

    from tfaccel.compat import capabilities
    from tfaccel.core.timer import interleave
    from tfaccel.generation.generators import load_generator

    work = Path(args.work or tempfile.mkdtemp(prefix="tfaccel-ov-decoder-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = _build(work)
    core = ov.Core()
    ort = {name: load_generator(paths[name]) for name in ("ort fp32", "ort int8")}
    read = lambda folder: core.read_model(str(folder / "decoder.onnx"))  # noqa: E731
    ovs = {"ov fp32 (traced)": OpenVINODecoder(paths["traced"], read(paths["traced"]), False),
           "ov int8 (traced)": OpenVINODecoder(paths["traced"], compress_int8(read(paths["traced"])), False),
           "ov int8 (native)": OpenVINODecoder(paths["ort fp32"], compress_int8(read(paths["ort fp32"])), True)}
    decoders = {**ort, **ovs}

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50000, (4, 2 * PROMPT)).astype(np.int32)

    def next_token_logits(name, row):  # one prompt at a time: OpenVINO's native graph runs batch 1 only
        return decoders[name].stepwise_logits(ids[row: row + 1], PROMPT)[:, PROMPT - 1: 2 * PROMPT - 1]

    ref = [next_token_logits("ort fp32", r) for r in range(4)]
    cosine = {}
    for name in ["ort int8", *ovs]:
        got = [next_token_logits(name, r) for r in range(4)]
        cosine[name] = min(float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())
                           for a, b in zip(ref, got, strict=True))
    caps = capabilities()
    print(f"\ngpt2-small (random weights), {PROMPT} prompt + {NEW} new tokens, greedy; {caps.cpu} ({caps.cpu_count} "
          f"cores); OpenVINO {ov.__version__}; load average {os.getloadavg()[0]:.2f} before timing\n")
    print("| decoder | next-token cosine min vs ort fp32 | batch 1 tokens/s | vs ort int8 | batch 8 tokens/s | vs ort int8 |")
    print("|---|---|---|---|---|---|")
    table: dict[str, list[str]] = {name: [] for name in decoders}
    for batch in (1, 8):
        prompt = rng.integers(1, 50000, (batch, PROMPT)).astype(np.int32)
        calls = {name: (lambda g=g, p=prompt: g.generate(p, NEW)) for name, g in decoders.items()
                 if batch == 1 or "native" not in name}
        timing = interleave(calls, runs=args.runs, warmup=1, max_seconds=None)
        base = timing.measurements["ort int8"].p50_ms
        for name in table:
            m = timing.measurements.get(name)
            table[name] += ([f"{batch * NEW / (m.p50_ms / 1e3):.1f}", f"{base / m.p50_ms:.2f}x"] if m else
                            ["n/a (OpenVINO's GroupQueryAttention fails above batch 1)", ""])
    for name, cells in table.items():
        print(f"| {name} | {'1' if name == 'ort fp32' else f'{cosine[name]:.5f}'} | {' | '.join(cells)} |")
    print(f"\nload average {os.getloadavg()[0]:.2f} after timing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
