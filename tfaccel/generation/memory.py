"""What a generation artifact costs in memory, measured the way a user meets it: a fresh Python process loads it
(RSS after load) and generates once (peak RSS during that generation, sampled every 2 ms), so nothing another
artifact left in the process counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tfaccel.errors import InputMismatchError

_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from tfaccel.core.measure import PeakRSS, rss_bytes
    spec = json.loads(sys.argv[1])
    start = rss_bytes()
    if spec["kind"] == "keras-hub":
        from tfaccel.sources import load_source
        model = load_source(spec["path"]).model
        from tfaccel.xla.generate_export import keras_hub_greedy
        run = lambda ids, mask, n: keras_hub_greedy(model, ids, mask, n)
    else:
        from tfaccel.generation import load_generator
        gen = load_generator(spec["path"], **spec["options"])
        run = lambda ids, mask, n: gen.generate(ids, n, -1, padding_mask=mask)
    loaded = rss_bytes()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, spec["vocab"], (spec["batch"], spec["prompt"])).astype("int32")
    mask = np.ones_like(ids)
    with PeakRSS() as mem:
        run(ids, mask, spec["new"])
    print("TFACCEL_MEMORY " + json.dumps({"start": start, "loaded": loaded, "peak": mem.peak}))
""")


def generation_memory(path: str | os.PathLike, *, batch: int = 1, prompt_tokens: int = 32, new_tokens: int = 64,
                      vocabulary_size: int = 1000, keras_hub_example: bool = False, timeout: float = 900,
                      **generator_options) -> dict:
    """RSS after loading a generation artifact and peak RSS while it generates once, in a fresh process.

    Args:
        path: a generation artifact (:func:`tfaccel.generation.load_generator`), or with ``keras_hub_example``
            a model source name / path whose keras-hub ``generate`` is measured instead.
        batch, prompt_tokens, new_tokens: the generation (random prompt ids below ``vocabulary_size``).
        timeout: seconds before the measurement is abandoned.
        **generator_options: for an ONNX decoder, ``intra_op_threads`` / ``spinning``.

    Returns:
        ``load_rss_mb`` (after loading), ``peak_rss_mb`` (highest during the generation), ``python_rss_mb`` (the
        interpreter with numpy and tfaccel imported, before loading).

    Raises:
        InputMismatchError: the probe process failed (its last error lines are in the message).

    Example:
        >>> generation_memory("out/stages/02-ort-decoder-int8")  # doctest: +SKIP
        {'python_rss_mb': 61.2, 'load_rss_mb': 398.4, 'peak_rss_mb': 421.0}
    """
    spec = {"kind": "keras-hub" if keras_hub_example else "artifact", "path": str(path), "options": generator_options,
            "batch": int(batch), "prompt": int(prompt_tokens), "new": int(new_tokens), "vocab": int(vocabulary_size)}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TFACCEL_MEMORY ")), None)
    if proc.returncode != 0 or line is None:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise InputMismatchError(f"Measuring the memory of {path} in a fresh process failed: {tail}")
    m = json.loads(line.split(" ", 1)[1])
    mb = 2**20
    return {"python_rss_mb": round(m["start"] / mb, 1), "load_rss_mb": round(m["loaded"] / mb, 1),
            "peak_rss_mb": round(max(m["peak"], m["loaded"]) / mb, 1)}
