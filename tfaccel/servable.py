"""Check that a SavedModel serves without tfaccel: in a fresh Python process that never imports tfaccel, load
it with ``tf.saved_model.load`` and run it, then load and run it again the way ``saved_model_cli run`` does (a
TF1 session over the ``serve`` MetaGraph, TF Serving's loader), on the same inputs. Both must succeed and agree.

The second load calls the body of ``saved_model_cli run`` (``run_saved_model_with_feed_dict``, after its own
``--inputs`` parser) in the same child rather than starting ``python -m ...saved_model_cli``: the loaders are
the same code, and the check pays for one TensorFlow start-up instead of two (about 8 CPU-seconds each on an
Ice Lake core).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from tfaccel.core.files import temporary_folder
from tfaccel.core.processes import run_child
from tfaccel.errors import TfaccelError

# Runs in a child process. It must not import tfaccel: that is what it checks.
_CHILD = r"""
import os, sys
import numpy as np
import tensorflow as tf
path, sig_name, in_npz, out_npz, cli_dir = sys.argv[1:6]
loaded = tf.saved_model.load(path)
fn = loaded.signatures[sig_name]
_, specs = fn.structured_input_signature
if os.path.exists(in_npz):
    with np.load(in_npz) as d:
        inputs = {k: d[k] for k in d.files}
else:
    rng = np.random.default_rng(0)
    inputs = {}
    for name, spec in specs.items():
        shape = [2 if i == 0 else (16 if d is None else d) for i, d in enumerate(spec.shape.as_list())]
        if spec.dtype.is_integer:
            arr = rng.integers(1, 100, size=shape) if name == "token_ids" else np.ones(shape) if name == "padding_mask" else np.zeros(shape)
        elif spec.dtype == tf.bool:
            arr = np.ones(shape, bool)
        else:
            arr = rng.standard_normal(shape)
        inputs[name] = np.asarray(arr).astype(spec.dtype.as_numpy_dtype)
    np.savez(in_npz, **inputs)
out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
np.savez(out_npz, **{k: v.numpy() for k, v in out.items()})
assert "tfaccel" not in sys.modules, "tfaccel was imported"
print("loaded-ok", sorted(out), flush=True)
# saved_model_cli run --dir path --tag_set serve --signature_def sig_name --inputs name=in_npz[name];...
# --outdir cli_dir --overwrite: what its `run` command does with those flags.
from tensorflow.python.tools import saved_model_cli
spec = ";".join(f"{k}={in_npz}[{k}]" for k in inputs)
try:
    feed = saved_model_cli.load_inputs_from_input_arg_string(spec, "", "")
    saved_model_cli.run_saved_model_with_feed_dict(path, "serve", sig_name, feed, cli_dir, True)
except Exception as exc:
    print(f"SAVED_MODEL_CLI_FAILED {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    sys.exit(3)
"""


class ServabilityError(TfaccelError):
    """The SavedModel does not load or run without tfaccel."""


def fresh_process_env() -> dict[str, str]:
    """The environment for a child process that must not see tfaccel's source tree (no PYTHONPATH), quiet TF."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def check_servable(saved_model_dir: str | os.PathLike, inputs: dict[str, np.ndarray] | None = None,
                   signature: str = "serving_default", atol: float = 1e-4, timeout: float = 900) -> dict:
    """Load and run a SavedModel in a fresh process without tfaccel, with both TensorFlow loaders.

    Args:
        saved_model_dir: the SavedModel folder.
        inputs: named input arrays; if None, small valid inputs are made from the signature.
        atol: how far the two loaders' outputs may differ.

    Returns:
        ``{"inputs": ..., "outputs": ...}``: the inputs used and the outputs of ``tf.saved_model.load``
        (which ``saved_model_cli run`` matched within ``atol``).

    Raises:
        ServabilityError: either loader failed, or they disagree.
    """
    path = Path(saved_model_dir).absolute()
    if not (path / "saved_model.pb").exists():
        raise ServabilityError(f"{str(path)!r} is not a SavedModel folder (no saved_model.pb).")
    env = fresh_process_env()
    with temporary_folder("serve-check") as tmp:
        in_npz, out_npz, cli_dir = Path(tmp, "inputs.npz"), Path(tmp, "outputs.npz"), Path(tmp, "cli")
        if inputs is not None:
            np.savez(in_npz, **inputs)
        proc = run_child([sys.executable, "-c", _CHILD, str(path), signature, str(in_npz), str(out_npz), str(cli_dir)],
                         capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
        if proc.returncode != 0 and "loaded-ok" not in proc.stdout:
            raise ServabilityError(f"tf.saved_model.load in a fresh process failed on {path}:\n{_tail(proc.stderr)}")
        if proc.returncode != 0:
            raise ServabilityError(f"saved_model_cli run failed on {path} (TF Serving loads the same way):\n"
                                   f"{_tail(proc.stderr)}")
        with np.load(in_npz) as d:
            used_inputs = {k: d[k] for k in d.files}
        with np.load(out_npz) as d:
            outputs = {k: d[k] for k in d.files}
        for name, want in outputs.items():
            got_path = cli_dir / f"{name}.npy"
            if not got_path.exists():
                raise ServabilityError(f"saved_model_cli run gave no output {name!r} for {path}.")
            got = np.load(got_path)
            if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=0):
                raise ServabilityError(
                    f"saved_model_cli run and tf.saved_model.load disagree on output {name!r} "
                    f"(max abs diff {np.max(np.abs(got.astype(float) - want.astype(float))):.3g})."
                )
    return {"inputs": used_inputs, "outputs": outputs}


def _tail(text: str, n: int = 12) -> str:
    lines = [ln for ln in text.strip().splitlines() if not ln.startswith(("W0000", "I0000", "E0000"))]
    return "\n".join(lines[-n:])
