"""Check that an OpenVINO IR serves with OpenVINO alone: compile and run it in a fresh Python process that
imports only ``openvino`` and numpy (never tfaccel, TensorFlow or Keras), with the precision tfaccel
validated it at, and compare its outputs with this process's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tfaccel.openvino.ir import compile_config, ir_xml, read_meta
from tfaccel.servable import ServabilityError, fresh_process_env

# Runs in a child process; it must import nothing but openvino and numpy.
_CHILD = r"""
import json, sys
import numpy as np
import openvino as ov
xml, config_json, in_npz, out_npz = sys.argv[1:5]
compiled = ov.Core().compile_model(xml, "CPU", json.loads(config_json))
with np.load(in_npz) as d:
    inputs = {k: d[k] for k in d.files}
result = compiled.create_infer_request().infer(inputs)
np.savez(out_npz, **{o.get_any_name(): np.array(result[o]) for o in compiled.outputs})
heavy = sorted(m for m in ("tfaccel", "tensorflow", "keras", "torch") if m in sys.modules)
assert not heavy, f"imported {heavy}"
print("openvino-ok", ov.__version__)
"""


def check_openvino_servable(path: str | os.PathLike, inputs: dict[str, np.ndarray] | None = None, *,
                            atol: float = 1e-4, timeout: float = 600) -> dict:
    """Compile and run an IR in a fresh process that has only OpenVINO, and compare with this process.

    Args:
        path: the IR folder or its .xml.
        inputs: named input arrays; None makes small token inputs (batch 2, length 16) from the IR's inputs.
        atol: how far the child's outputs may differ from this process's (same plugin settings).
        timeout: seconds for the child.

    Returns:
        ``{"inputs": ..., "outputs": ..., "config": ...}``: what the child ran and returned.

    Raises:
        ServabilityError: the child failed, imported more than OpenVINO, or disagrees with this process.

    Example:
        >>> check_openvino_servable("out/stages/02-openvino/openvino")["config"]["INFERENCE_PRECISION_HINT"]  # doctest: +SKIP
        'bf16'
    """
    from tfaccel.openvino.ir import OpenVINORunner

    xml = ir_xml(path).absolute()
    meta = read_meta(xml)
    precision = meta.get("inference_precision") or "f32"
    config = compile_config(precision, "latency", meta.get("threads"))
    runner = OpenVINORunner(xml, precision=precision, hint="latency", threads=meta.get("threads"))
    if inputs is None:
        rng = np.random.default_rng(0)
        inputs = {}
        for name, dtype in runner.input_types.items():
            shape = (2, 16)
            arr = (rng.integers(1, 100, size=shape) if name == "token_ids" else
                   np.ones(shape) if name == "padding_mask" else np.zeros(shape))
            inputs[name] = np.asarray(arr).astype(dtype)
    want = runner(inputs)
    import json

    with tempfile.TemporaryDirectory() as tmp:
        in_npz, out_npz = Path(tmp, "inputs.npz"), Path(tmp, "outputs.npz")
        np.savez(in_npz, **inputs)
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(xml), json.dumps(config), str(in_npz), str(out_npz)],
                              capture_output=True, text=True, timeout=timeout, env=fresh_process_env(), cwd=tmp)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise ServabilityError(f"OpenVINO alone could not run {xml} in a fresh process:\n{tail}")
        with np.load(out_npz) as d:
            got = {k: d[k] for k in d.files}
    for name, w in want.items():
        if name not in got:
            raise ServabilityError(f"the fresh OpenVINO process gave no output {name!r} for {xml} (it gave {sorted(got)}).")
        if got[name].shape != w.shape or not np.allclose(got[name], w, atol=atol, rtol=0):
            diff = float(np.max(np.abs(got[name].astype(float) - w.astype(float))))
            raise ServabilityError(f"OpenVINO in a fresh process and tfaccel's runner disagree on {name!r} for {xml} "
                                   f"(max abs diff {diff:.3g}).")
    return {"inputs": inputs, "outputs": got, "config": config}
