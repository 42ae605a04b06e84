"""ONNX -> serialized TensorRT engine with the ``tensorrt`` Python API (TensorRT 10 and 11).

The build follows :func:`tfaccel.tensorrt.plan_build`: the precision is set by builder flags where
the installed TensorRT has them (10) and by the ONNX graph's types where it does not (11). ONNX
parser errors are reported with the ONNX node they are about (index, name, op type).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tfaccel.core.files import atomic_file
from tfaccel.errors import StepError
from tfaccel.onnx.ort_fusions import contrib_operators
from tfaccel.tensorrt.availability import import_tensorrt, require_gpu
from tfaccel.tensorrt.shape_profiles import ShapeProfile
from tfaccel.tensorrt.trt_api import BuildPlan, TrtApi, plan_build
from tfaccel.tensorrt.trt_config import TensorRTConfig

ENGINE_FILE = "model.engine"
INFO_FILE = "engine_info.json"
_UNSUPPORTED_CODES = {"UNSUPPORTED_NODE", "UNSUPPORTED_NODE_ATTR", "UNSUPPORTED_NODE_INPUT",
                      "UNSUPPORTED_NODE_DATATYPE", "UNSUPPORTED_NODE_DYNAMIC", "UNSUPPORTED_NODE_SHAPE",
                      "UNSUPPORTED_GRAPH"}


@dataclasses.dataclass(frozen=True)
class ParserIssue:
    """One error of TensorRT's ONNX parser, as plain data.

    Attributes:
        code: the parser's ErrorCode name, e.g. "UNSUPPORTED_NODE".
        desc: the parser's description.
        node_index: index of the ONNX node in ``graph.node`` (-1 when the error is not about a node).
        node_name, op_type: as the parser reports them (may be empty; filled from the ONNX file).
    """

    code: str
    desc: str
    node_index: int = -1
    node_name: str = ""
    op_type: str = ""

    @classmethod
    def from_trt(cls, err: Any) -> ParserIssue:
        """From a ``tensorrt.ParserError`` (TensorRT 10/11: code(), desc(), node(), node_name(), node_operator())."""
        def call(name, default):
            fn = getattr(err, name, None)
            try:
                return fn() if callable(fn) else default
            except Exception:
                return default

        code = str(call("code", "UNKNOWN")).rsplit(".", 1)[-1]
        return cls(code=code, desc=str(call("desc", str(err))), node_index=int(call("node", -1)),
                   node_name=str(call("node_name", "") or ""), op_type=str(call("node_operator", "") or ""))


def describe_parser_errors(issues: Sequence[ParserIssue], onnx_path: str | os.PathLike,
                           tensorrt_version: str = "") -> str:
    """A message naming every ONNX node the parser rejected and what to do about it.

    Node names and op types missing from the parser's report are read from the ONNX file.

    Example:
        >>> describe_parser_errors([ParserIssue("UNSUPPORTED_NODE", "No importer registered for op: Foo", 3)],
        ...                        "model.onnx")  # doctest: +SKIP
        "TensorRT's ONNX parser rejected model.onnx (1 error):\\n  - node 3 'foo' (Foo): ..."
    """
    nodes: list[Any] = []
    try:
        import onnx

        nodes = list(onnx.load(str(onnx_path), load_external_data=False).graph.node)
    except Exception:  # the file itself may be what the parser could not read
        nodes = []
    lines, unsupported = [], []
    for issue in issues:
        name, op = issue.node_name, issue.op_type
        if 0 <= issue.node_index < len(nodes):
            node = nodes[issue.node_index]
            name, op = name or node.name, op or node.op_type
        where = (f"node {issue.node_index} '{name}' ({op})" if issue.node_index >= 0 or name
                 else "the graph")
        lines.append(f"  - {where}: [{issue.code}] {issue.desc}")
        if (issue.code in _UNSUPPORTED_CODES or "No importer registered" in issue.desc) and op:
            unsupported.append(op)
    who = f"TensorRT {tensorrt_version}'s" if tensorrt_version else "TensorRT's"
    n = len(issues)
    msg = f"{who} ONNX parser rejected {onnx_path} ({n} error{'s' if n != 1 else ''}):\n" + "\n".join(lines)
    if unsupported:
        ops = ", ".join(sorted(set(unsupported)))
        msg += (f"\nTensorRT cannot import these ops as they are: {ops}. Try another opset (--set onnx.opset=N), "
                "keep those ops out of the exported signature, or give TensorRT a plugin for them.")
    return msg


def _make_logger(trt, log=None):
    class _Logger(trt.ILogger):
        """Keeps errors for the exception message; passes warnings to the pipeline log."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):  # noqa: D401 - TensorRT's callback name
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
            if log is not None and level <= int(trt.ILogger.Severity.WARNING):
                log(f"  TensorRT: {msg}")

    return _Logger()


def _network_flags(trt, plan: BuildPlan) -> int:
    flags = 0
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def prepare_onnx(onnx_path: str | os.PathLike, plan: BuildPlan, work_dir: str | os.PathLike,
                 calibration_batches: Sequence[dict] | None = None, *, per_channel: bool = True) -> str:
    """The ONNX file TensorRT parses for ``plan``: the input itself, its fp16 conversion, or its int8 Q/DQ form.

    Example:
        >>> prepare_onnx("model.onnx", plan_build("fp16", TrtApi.of(trt)), "work")  # doctest: +SKIP
        'work/model.fp16.onnx'
    """
    from tfaccel.tensorrt.onnx_precision import convert_onnx_to_fp16, quantize_onnx_qdq_int8

    work_dir = Path(work_dir)
    if plan.onnx_transform is None:
        return str(onnx_path)
    if plan.onnx_transform == "fp16":
        return convert_onnx_to_fp16(onnx_path, work_dir / "model.fp16.onnx")
    if plan.onnx_transform == "int8-qdq":
        if not calibration_batches:
            raise StepError("An int8 engine needs calibration batches (a representative dataset); none were given.")
        return quantize_onnx_qdq_int8(onnx_path, work_dir / "model.int8-qdq.onnx", calibration_batches,
                                      per_channel=per_channel)
    raise ValueError(f"Unknown ONNX transform {plan.onnx_transform!r}")


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                 config: TensorRTConfig | str | None = None, *, profiles: Sequence[ShapeProfile] | None = None,
                 calibration_batches: Sequence[dict] | None = None, log=None) -> dict[str, Any]:
    """Build a TensorRT engine from an ONNX model and write it to ``engine_path``.

    Args:
        onnx_path: an ONNX model (e.g. from the ``onnx`` step), float32.
        engine_path: the serialized engine to write; ``engine_info.json`` is written beside it.
        config: a :class:`TensorRTConfig` or a precision string ("fp16" = the default config).
        profiles: optimization profiles (default: ``config.profiles``); one is required for dynamic inputs.
        calibration_batches: representative input dicts, for int8.
        log: callable receiving progress lines.

    Returns:
        What was built (TensorRT version, build plan, profiles, inputs/outputs), as also written to
        ``engine_info.json``.

    Raises:
        MissingDependencyError: ``tensorrt`` is not installed (``pip install 'tfaccel[trt]'``).
        StepError: no GPU, the parser rejected the ONNX (nodes named), or the build failed.

    Example:
        >>> build_engine("model.onnx", "model.engine", "fp16",
        ...              profiles=[ShapeProfile(batch=(1, 8, 32), seq=(1, 128, 128))])  # doctest: +SKIP
    """
    if config is None or isinstance(config, str):
        config = TensorRTConfig(config or "fp16")
    profiles = list(profiles or config.profiles or [])
    contrib = contrib_operators(onnx_path)  # the parser has no importer for them: say so before any GPU work
    if contrib:
        raise StepError(
            f"TensorRT's ONNX parser cannot read onnxruntime's contrib operators, and {onnx_path} has them: "
            + ", ".join(f"{op} x{n}" for op, n in sorted(contrib.items()))
            + ". Give TensorRT standard ONNX: the onnx step writes it when tensorrt starts from it (do not set "
            "onnx.fuse=true), or with --set onnx.fuse=false; an ONNX decoder traced from keras-hub's layers "
            "(--set onnx-decoder.graph=keras-layers).")
    trt = import_tensorrt()
    require_gpu("Building a TensorRT engine")
    api = TrtApi.of(trt)
    plan = plan_build(config.precision, api, allow_tf32=config.allow_tf32)
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parsed_path = prepare_onnx(onnx_path, plan, engine_path.parent, calibration_batches, per_channel=config.per_channel)

    logger = _make_logger(trt, log)
    builder = trt.Builder(logger)
    if builder is None:
        raise StepError("TensorRT could not create a builder (no CUDA device?): " + "; ".join(logger.errors))
    network = builder.create_network(_network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(parsed_path)):
        issues = [ParserIssue.from_trt(parser.get_error(i)) for i in range(parser.num_errors)]
        raise StepError(describe_parser_errors(issues, parsed_path, api.version))

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dims = {t.name: tuple(int(d) for d in t.shape) for t in inputs}
    dynamic = any(d < 0 for ds in dims.values() for d in ds)
    if dynamic and not profiles:
        raise StepError(
            f"{onnx_path} has dynamic input dimensions {dims}; an engine needs at least one ShapeProfile for them "
            "(the tensorrt step derives one from the model source; see TensorRTConfig.profiles)."
        )
    cfg = builder.create_builder_config()
    if config.max_workspace_bytes is not None:
        cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.max_workspace_bytes)
    for flag in plan.set_flags:
        cfg.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.clear_flags:
        cfg.clear_flag(getattr(trt.BuilderFlag, flag))
    if hasattr(cfg, "builder_optimization_level"):
        cfg.builder_optimization_level = config.optimization_level
    profile_shapes = []
    for prof in profiles if dynamic else []:
        p = builder.create_optimization_profile()
        shapes = {}
        for name, ds in dims.items():
            lo, opt, hi = prof.shapes([None if d < 0 else d for d in ds])
            p.set_shape(name, lo, opt, hi)
            shapes[name] = [list(lo), list(opt), list(hi)]
        cfg.add_optimization_profile(p)
        profile_shapes.append(shapes)
    if log:
        log(f"  TensorRT {api.version}: building {config.precision} engine ({plan.description}); "
            + "; ".join(p.describe() for p in profiles))
    serialized = builder.build_serialized_network(network, cfg)
    if serialized is None:
        detail = "; ".join(logger.errors[-5:]) or "no error message from TensorRT"
        raise StepError(
            f"TensorRT {api.version} could not build a {config.precision} engine from {parsed_path}: {detail}. "
            "If it ran out of GPU memory, lower max_workspace_bytes or max_batch/max_seq, and set "
            "TF_FORCE_GPU_ALLOW_GROWTH=true so TensorFlow in the same process does not hold the GPU's memory."
        )
    with atomic_file(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    info = {
        "tensorrt": api.version,
        "precision": config.precision,
        "plan": plan.get_config(),
        "config": config.get_config(),
        "profiles": [p.get_config() for p in profiles],
        "profile_shapes": profile_shapes,
        "inputs": {t.name: {"dtype": str(t.dtype), "shape": list(dims[t.name])} for t in inputs},
        "outputs": [network.get_output(i).name for i in range(network.num_outputs)],
        "onnx": Path(parsed_path).name if Path(parsed_path).parent == engine_path.parent else str(parsed_path),
        "build_seconds": round(time.perf_counter() - t0, 3),
        "note": "A TensorRT engine runs only with the TensorRT version and GPU model it was built with.",
    }
    (engine_path.parent / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info
