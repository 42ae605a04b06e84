"""SavedModel -> ONNX with tf2onnx, run in a child process (it is slow and memory hungry, and a crash
there must not take the pipeline down)."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tfaccel.core.artifact import Artifact
from tfaccel.core.files import atomic_file
from tfaccel.core.processes import run_child
from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.errors import OverBudget, PlanError, StepError

DEFAULT_OPSET = 17  # tf2onnx 1.17 is tested up to opset 18; 17 is what onnxruntime and TensorRT 10/11 take best

#: tfaccel's handlers for ops tf2onnx lacks (``Erfc``: Keras 3's exact gelu), loaded in the child process
#: before ``tf2onnx.convert.main`` runs. Loaded by path, so the child does not import tfaccel itself.
_HANDLERS_FILE = Path(__file__).with_name("tf2onnx_handlers.py")
_CONVERT_WITH_HANDLERS = (
    "import runpy, sys\n"
    "runpy.run_path(sys.argv.pop(1), run_name='tfaccel_tf2onnx_handlers')\n"
    "sys.argv[0] = 'tf2onnx.convert'\n"
    "from tf2onnx import convert\n"
    "convert.main()\n"
)


def _unsupported_ops(log: str) -> list[str]:
    ops = set(re.findall(r"Tensorflow op \[[^\]]*: ([A-Za-z0-9_]+)\] is not supported", log))
    for m in re.findall(r"Unsupported ops: Counter\(\{([^}]*)\}\)", log):
        ops.update(re.findall(r"'([A-Za-z0-9_]+)'", m))
    return sorted(ops)


def convert_saved_model(saved_model_dir: str | os.PathLike, output_path: str | os.PathLike, *,
                        opset: int = DEFAULT_OPSET, signature: str = "serving_default",
                        timeout: float | None = 3600, log=None, deadline: float | None = None) -> str:
    """Convert a SavedModel signature to an ONNX file with tf2onnx.

    tf2onnx runs in a child process with tfaccel's extra op handlers loaded first
    (:mod:`tfaccel.onnx.tf2onnx_handlers`: ``Erfc``, the exact gelu of keras-hub DistilBERT, RoBERTa,
    XLM-RoBERTa, DeBERTa-v3 and Falcon).

    Args:
        deadline: a ``time.perf_counter()`` at which the child is stopped (``--auto``'s time budget), before
            ``timeout`` if sooner.

    Raises:
        MissingDependencyError: tf2onnx is not installed.
        OverBudget: the conversion was stopped at ``deadline``.
        StepError: the conversion failed or ran past ``timeout``; unsupported TensorFlow ops are named.
    """
    from tfaccel.compat import require

    require("tf2onnx", purpose="the onnx step")
    output_path = Path(output_path)
    t0, stop_at_deadline = time.perf_counter(), False
    if deadline is not None:
        left = deadline - t0
        if left <= 0:
            raise OverBudget("no time was left before the step's deadline to start tf2onnx")
        if timeout is None or left < timeout:
            timeout, stop_at_deadline = left, True
    with atomic_file(output_path) as tmp_out:
        cmd = [sys.executable, "-c", _CONVERT_WITH_HANDLERS, str(_HANDLERS_FILE), "--saved-model",
               str(saved_model_dir), "--output", str(tmp_out), "--opset", str(opset), "--signature_def", signature]
        if log:
            log(f"  tf2onnx: converting {saved_model_dir} (opset {opset}); BERT-base takes about 2 minutes")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        with tempfile.TemporaryFile("w+") as logf:
            try:
                proc = run_child(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout, env=env)
            except subprocess.TimeoutExpired as exc:
                if stop_at_deadline:
                    raise OverBudget(f"tf2onnx was stopped at the step's deadline, after {time.perf_counter() - t0:.0f}s "
                                     "of converting", max_seconds=timeout) from exc
                raise StepError(f"tf2onnx did not finish within {timeout}s on {saved_model_dir}.") from exc
            logf.seek(0)
            text = logf.read()
        ops = _unsupported_ops(text)
        if proc.returncode != 0 or not tmp_out.exists() or ops:
            if ops:
                raise StepError(
                    f"tf2onnx cannot convert these TensorFlow ops to ONNX opset {opset}: {', '.join(ops)}. "
                    "Try a newer opset (--set onnx.opset=18), or keep those ops out of the exported signature."
                )
            tail = "\n".join(text.strip().splitlines()[-15:])
            raise StepError(f"tf2onnx failed (exit {proc.returncode}) on {saved_model_dir}:\n{tail}")
    return str(output_path)


class OnnxStep(Step):
    """SavedModel -> ONNX (tf2onnx), checked with onnxruntime. A side artifact of the run.

    Args:
        opset: ONNX opset to target (recorded in the report).
        fuse: apply onnxruntime's transformer fusions to the graph (:func:`tfaccel.onnx.ort_fusions.fuse_for_onnxruntime`:
            the gelu fuses on tf2onnx's BERT graphs into onnxruntime's ``FastGelu``); the report lists what fused.
            None (the default): fuse, unless a step that parses standard ONNX only (``tensorrt``) starts from
            this one, which then gets the graph without onnxruntime's contrib operators. True with such a
            step is refused at plan time; False: standard ONNX for any runtime.
    """

    name = "onnx"
    consumes = "saved_model"
    produces = "onnx"
    side_artifact = True
    # Refused at plan time, not after the quantized stage is built (measured on bert-tiny).
    takes_quantized = frozenset()
    quantized_input_reason = ("tf2onnx 1.17 converts neither the int8 step's SavedModel ('StatefulPartitionedCall' "
                              "unsupported) nor int4's (BitwiseAnd, BitwiseXor)")
    # onnxruntime fuses and reorders float32 math: small float differences, same results.
    default_tolerance = Tolerance(max_abs_diff=1e-3, min_cosine=0.9999, max_accuracy_drop=0.0)

    def __init__(self, opset: int = DEFAULT_OPSET, fuse: bool | None = None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(opset, int) or not 13 <= opset <= 21:
            raise ValueError(f"opset must be an int from 13 to 21. Received: opset={opset!r}")
        if fuse is not None and not isinstance(fuse, bool):
            raise ValueError(f"fuse must be true or false (or left out). Received: fuse={fuse!r}")
        self.opset = opset
        self.fuse_given = fuse is not None
        self.fuse = True if fuse is None else fuse
        #: the step that parses this ONNX and needs it standard (set on the copy :meth:`feeding` returns)
        self.standard_for = ""

    def params(self):
        return {"opset": self.opset, "fuse": self.fuse}

    def feeding(self, consumer: Step) -> Step:
        """Unfused for a step that parses standard ONNX only (``tensorrt``); see ``fuse``."""
        if not consumer.standard_onnx_only or not self.fuse:
            return self
        if self.fuse_given:
            raise PlanError(
                f"Step '{consumer.name}' starts from the onnx step's model and parses standard ONNX only "
                f"({consumer.standard_onnx_only}), but onnx has fuse=true, which writes onnxruntime's contrib "
                f"operators (FastGelu, ...). Drop --set onnx.fuse=true (or set it false): the onnx step then writes "
                f"standard ONNX for '{consumer.name}'.")
        unfused = copy.copy(self)
        unfused.fuse, unfused.standard_for = False, consumer.name
        return unfused

    def unavailable(self, caps) -> str:
        missing = [n for n, v in (("tf2onnx", caps.tf2onnx), ("onnxruntime", caps.onnxruntime)) if not v]
        return f"{' and '.join(missing)} not installed (pip install {' '.join(missing)})" if missing else ""

    def check(self, source) -> None:
        """A missing tf2onnx or onnxruntime is found here, before any step runs (MissingDependencyError)."""
        from tfaccel.compat import require

        require("tf2onnx", purpose="the onnx step (SavedModel -> ONNX)")
        require("onnxruntime", purpose="checking the ONNX model")
        super().check(source)

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        path = convert_saved_model(artifact.path, ctx.stage_dir / "model.onnx", opset=self.opset, log=ctx.log,
                                   deadline=ctx.deadline)
        info = {"opset": self.opset}
        if self.fuse:
            from tfaccel.onnx.ort_fusions import fuse_for_onnxruntime

            fused = info["fused"] = fuse_for_onnxruntime(path)
            counts = {k: v for k, v in fused.items() if k != "skipped"}
            ctx.note("onnxruntime transformer fusions: " + (", ".join(f"{k} x{v}" for k, v in counts.items())
                                                            if counts else "none matched"))
            for library, error in fused.get("skipped", {}).items():
                ctx.note(f"{library} fusions skipped (they raised on this graph, which is kept unfused): {error}")
        elif self.standard_for:
            ctx.note(f"onnxruntime transformer fusions left out: '{self.standard_for}' parses standard ONNX only")
        return Artifact(kind="onnx", path=path, input_names=artifact.input_names, info=info)
