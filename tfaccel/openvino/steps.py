"""Steps ``openvino`` (SavedModel -> OpenVINO IR) and ``ov-int8`` (NNCF post-training int8 of that IR).

Both are side artifacts, validated against the reference like every stage, and run in OpenVINO's CPU
plugin with every setting explicit: the inference precision (decided by
:meth:`tfaccel.compat.Capabilities.openvino_precision`), the performance hint and the thread count.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tfaccel.core.artifact import Artifact
from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.errors import PlanError, StepError
from tfaccel.openvino.ir import (
    EXTRA,
    HINTS,
    OPENVINO_KIND,
    QUANTIZED_INPUT_HINT,
    compile_config,
    convert_saved_model,
    ir_xml,
    quantized_saved_model_reason,
    read_meta,
    save_ir,
)

PRECISIONS = ("auto", "f32", "bf16")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}. Received: {name}={value!r}")


def _check_threads(threads: Any) -> None:
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be a positive int or unset (all cores). Received: threads={threads!r}")


class _OpenVINOStepBase(Step):
    side_artifact = True

    def __init__(self, inference_precision: str = "auto", performance_hint: str = "auto",
                 threads: int | None = None, **kwargs):
        _check_choice("inference_precision", inference_precision, PRECISIONS)
        _check_choice("performance_hint", performance_hint, HINTS)
        _check_threads(threads)
        if kwargs.get("tolerance") is None and inference_precision == "f32":
            kwargs["tolerance"] = self.f32_tolerance
        super().__init__(**kwargs)
        self.inference_precision = inference_precision
        self.performance_hint = performance_hint
        self.threads = threads

    def precision(self) -> tuple[str, str]:
        """The precision the CPU plugin will compute in here, and why."""
        from tfaccel.compat import capabilities

        try:
            return capabilities().openvino_precision(self.inference_precision)
        except ValueError as exc:
            raise PlanError(f"Step '{self.name}': {exc}") from exc

    #: The packages this step imports (all in the ``openvino`` extra).
    packages: tuple[str, ...] = ("openvino",)

    def unavailable(self, caps) -> str:
        missing = [n for n in self.packages if not getattr(caps, n, None)]
        if missing:
            return f"{' and '.join(missing)} not installed (pip install 'tfaccel[{EXTRA}]')"
        try:
            caps.openvino_precision(self.inference_precision)
        except ValueError as exc:
            return str(exc)
        return ""

    def check(self, source) -> None:
        """A missing package is a MissingDependencyError naming the extra; a precision this CPU lacks a PlanError."""
        from tfaccel.compat import require

        for package in self.packages:
            require(package, extra=EXTRA, purpose=f"the {self.name} step")
        self.precision()
        super().check(source)

    def params(self) -> dict[str, Any]:
        precision, why = self.precision()
        return {"inference_precision": precision, "inference_precision_requested": self.inference_precision,
                "inference_precision_why": why, "performance_hint": self.performance_hint,
                "threads": self.threads or "all cores"}

    def _meta(self) -> dict[str, Any]:
        precision, why = self.precision()
        return {"inference_precision": precision, "inference_precision_why": why,
                "performance_hint": self.performance_hint, "threads": self.threads}

    def _note_runtime(self, ctx: StepContext) -> None:
        precision, why = self.precision()
        config = compile_config(precision, "latency", self.threads)
        hint = {"auto": "latency hint below the plugin's stream count, throughput hint (batch split across its "
                        "streams) from it", "latency": "latency hint", "throughput": "throughput hint"}
        ctx.note(f"runs in OpenVINO's CPU plugin: inference precision {precision} ({why}), "
                 f"{hint[self.performance_hint]}, {config['INFERENCE_NUM_THREADS']} threads")


class OpenVINOStep(_OpenVINOStepBase):
    """SavedModel -> OpenVINO IR (``openvino.convert_model``), run in OpenVINO's CPU plugin. A side artifact.

    Takes any float SavedModel tfaccel can start from: the export, a pruned model's export, a SavedModel
    source. A quantized SavedModel (tfaccel's int8/int4) is refused at plan time: OpenVINO's frontend has no
    rule for the oneDNN int8 ops, and the Keras int8 forms convert to a graph far from the SavedModel;
    quantize in OpenVINO with ``ov-int8`` instead.

    Args:
        inference_precision: "auto" (bf16 where the CPU has bf16 instructions, else f32: see
            :meth:`tfaccel.compat.Capabilities.openvino_precision`), "f32" or "bf16".
        performance_hint: "auto" (latency for a batch smaller than the plugin's throughput streams, else
            the batch split across them), "latency" (one request, all threads) or "throughput" (see
            :class:`tfaccel.openvino.OpenVINORunner`).
        threads: inference threads (None: all cores).
        compress_to_fp16: store the IR's weights in fp16 (OpenVINO's default; half the size).

    Example:
        >>> Pipeline(["export", "openvino"]).run(load_source("minilm-bbc"), "out")  # doctest: +SKIP
    """

    name = "openvino"
    consumes = "saved_model"
    produces = OPENVINO_KIND
    #: A float SavedModel only (see the class docstring); Pipeline.plan refuses a quantized input.
    accepts_quantized_input = False
    quantized_input_reason = ("OpenVINO's TensorFlow frontend has no rule for the oneDNN int8 ops, and the Keras "
                              "int8 forms convert to a graph far from the SavedModel; quantize with 'ov-int8' instead")
    # fp16-stored weights and bf16 matmuls (the default on bf16 CPUs): small drift, the same predictions.
    default_tolerance = Tolerance(max_abs_diff=None, min_cosine=0.995, max_accuracy_drop=0.01)
    # f32 compute on fp16-stored weights: minilm-bbc's logits cosine 0.99978, the same accuracy
    f32_tolerance = Tolerance(max_abs_diff=None, min_cosine=0.999, max_accuracy_drop=0.0)

    def __init__(self, inference_precision: str = "auto", performance_hint: str = "auto",
                 threads: int | None = None, compress_to_fp16: bool = True, **kwargs):
        if not isinstance(compress_to_fp16, bool):
            raise ValueError(f"compress_to_fp16 must be true or false. Received: {compress_to_fp16!r}")
        super().__init__(inference_precision, performance_hint, threads, **kwargs)
        self.compress_to_fp16 = compress_to_fp16

    def check(self, source) -> None:
        super().check(source)
        if source.kind == "saved_model" and source.path:
            why = quantized_saved_model_reason(source.path)
            if why:
                raise PlanError(f"Step 'openvino' cannot convert the SavedModel {source.path}: {why}; "
                                f"{QUANTIZED_INPUT_HINT}.")

    def params(self) -> dict[str, Any]:
        return {**super().params(), "weights": "fp16" if self.compress_to_fp16 else "fp32"}

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        why = quantized_saved_model_reason(artifact.path)
        if why:  # plan() refuses such chains; this guards direct calls
            raise StepError(f"Step 'openvino' cannot convert {artifact.path}: {why}; {QUANTIZED_INPUT_HINT}.")
        path = convert_saved_model(artifact.path, ctx.stage_dir / "openvino", compress_to_fp16=self.compress_to_fp16,
                                   meta={**self._meta(), "source_saved_model": str(artifact.path)}, log=ctx.log)
        self._note_runtime(ctx)
        return Artifact(kind=OPENVINO_KIND, path=str(path), input_names=artifact.input_names,
                        info={"inference_precision": self.precision()[0]})


class OpenVINOInt8Step(_OpenVINOStepBase):
    """OpenVINO IR -> int8 IR with NNCF post-training quantization (``ModelType.TRANSFORMER``). A side artifact.

    Calibrates on ``--calibration-data``, else the source's eval data, else its sample inputs (one example
    per calibration item, ``samples`` of them). With ``accuracy_control=True`` it runs
    ``nncf.quantize_with_accuracy_control`` instead: layers are put back to float, most harmful first, until
    the accuracy on the labelled eval data is within the step's budget (``max_accuracy_drop`` of its
    tolerance, 1 point by default). The weight range follows the CPU
    (:meth:`tfaccel.compat.Capabilities.openvino_int8_settings`: 7-bit weights without VNNI).

    Args:
        samples: calibration examples (``subset_size``; 64 by default).
        accuracy_control: quantize with accuracy control on the labelled eval data.
        inference_precision, performance_hint, threads: as for :class:`OpenVINOStep` (the precision applies
            to the layers left in float).

    Example:
        >>> Pipeline(["export", "openvino", "ov-int8"]).run(load_source("minilm-bbc"), "out")  # doctest: +SKIP
    """

    name = "ov-int8"
    consumes = OPENVINO_KIND
    produces = OPENVINO_KIND
    default_tolerance = Tolerance(max_abs_diff=None, min_cosine=0.98, max_accuracy_drop=0.01)
    f32_tolerance = default_tolerance

    def __init__(self, samples: int = 64, accuracy_control: bool = False, inference_precision: str = "auto",
                 performance_hint: str = "auto", threads: int | None = None, **kwargs):
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"samples must be a positive int. Received: samples={samples!r}")
        if not isinstance(accuracy_control, bool):
            raise ValueError(f"accuracy_control must be true or false. Received: {accuracy_control!r}")
        super().__init__(inference_precision, performance_hint, threads, **kwargs)
        self.samples = samples
        self.accuracy_control = accuracy_control

    packages = ("openvino", "nncf")

    def check(self, source) -> None:
        super().check(source)
        if self.accuracy_control:
            if source.eval_labels is None or source.task != "classification":
                raise PlanError("Step 'ov-int8' with accuracy_control=true needs labelled eval data to judge accuracy "
                                "on: pass --eval-data / --eval-texts (a classification model), or use "
                                "accuracy_control=false.")
            if self.tolerance.max_accuracy_drop is None:
                raise PlanError("Step 'ov-int8' with accuracy_control=true needs an accuracy budget: set "
                                "tolerance.max_accuracy_drop.")

    def settings(self) -> dict[str, Any]:
        from tfaccel.compat import capabilities

        return capabilities().openvino_int8_settings()

    def params(self) -> dict[str, Any]:
        st = self.settings()
        return {**super().params(), "samples": self.samples, "accuracy_control": self.accuracy_control,
                "model_type": "transformer", "overflow_fix": st["overflow_fix"], "overflow_fix_why": st["reason"]}

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        import nncf
        import openvino as ov

        from tfaccel.tensorrt.calibration import describe_batches, representative_batches

        st = self.settings()
        model = ov.Core().read_model(str(ir_xml(artifact.path)))
        items = representative_batches(ctx.source, samples=self.samples, batch_size=1)
        ctx.note("NNCF calibration on " + describe_batches(items, ctx.source))
        advanced = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix(st["overflow_fix"]))
        ctx.note(f"overflow_fix={st['overflow_fix']}: {st['reason']}")
        common = {"model_type": nncf.ModelType.TRANSFORMER, "subset_size": len(items)}
        if self.accuracy_control:
            quantized = self._quantize_with_accuracy_control(model, items, advanced, common, ctx)
        else:
            ctx.log(f"  nncf.quantize (ModelType.TRANSFORMER, {len(items)} calibration samples)")
            quantized = nncf.quantize(model, nncf.Dataset(items), advanced_parameters=advanced, **common)
        meta = {**read_meta(artifact.path), **self._meta(),
                "quantization": {"tool": "nncf", "nncf": nncf.__version__, "samples": len(items),
                                 "accuracy_control": self.accuracy_control, "overflow_fix": st["overflow_fix"]}}
        path = save_ir(quantized, ctx.stage_dir / "openvino", meta=meta)
        fq = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
        ctx.note(f"{fq} FakeQuantize nodes (int8 inputs of matmuls)")
        self._note_runtime(ctx)
        return Artifact(kind=OPENVINO_KIND, path=str(path), input_names=artifact.input_names,
                        info={"quantization": "int8", "inference_precision": self.precision()[0]})


    def _quantize_with_accuracy_control(self, model, items, advanced, common, ctx: StepContext):
        """``nncf.quantize_with_accuracy_control`` on a static-shape copy, then the same float layers on the IR.

        NNCF 3.4's quantizer removal fails with a KeyError on graphs with dynamic shapes (the ShapeOf
        subgraphs of a dynamic batch and sequence: seen on every keras-hub BERT here), so the search runs on a
        copy reshaped to one example at the eval data's length; the layers it puts back to float are then
        left out (``IgnoredScope``) of an ordinary ``nncf.quantize`` of the dynamic IR, which the pipeline
        validates against the budget like any stage.
        """
        import nncf

        budget = float(self.tolerance.max_accuracy_drop)
        n = len(ctx.source.eval_labels)
        ctx.log(f"  nncf.quantize_with_accuracy_control (ModelType.TRANSFORMER, {len(items)} samples, max drop "
                f"{budget * 100:g} points on {n} labelled examples)")
        static = model.clone()
        static.reshape({i.get_any_name(): list(items[0][i.get_any_name()].shape) for i in static.inputs})
        val = _labelled_items(ctx.source, items[0])
        plain = nncf.quantize(static.clone(), nncf.Dataset(items), advanced_parameters=advanced, **common)
        controlled = nncf.quantize_with_accuracy_control(
            static, nncf.Dataset(items), nncf.Dataset(val), _accuracy_fn(), max_drop=budget,
            drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced, **common)
        reverted = sorted(_quantized_ops(plain) - _quantized_ops(controlled))
        ctx.note(f"accuracy control: budget {budget * 100:g} points on the {n} labelled eval examples (which also "
                 f"judge the result); {len(reverted)} operation(s) left in float"
                 + (f": {', '.join(reverted[:8])}{' ...' if len(reverted) > 8 else ''}" if reverted else ""))
        ignored = nncf.IgnoredScope(names=reverted, validate=False) if reverted else None
        return nncf.quantize(model, nncf.Dataset(items), advanced_parameters=advanced, ignored_scope=ignored,
                             **common)


def _quantized_ops(model) -> set[str]:
    """Names of the operations that take a FakeQuantize output (the int8 ones)."""
    out = set()
    for op in model.get_ops():
        if op.get_type_name() in ("MatMul", "Convolution", "Multiply", "Add", "Softmax"):
            if any(inp.get_source_output().get_node().get_type_name() == "FakeQuantize" for inp in op.inputs()):
                out.add(op.get_friendly_name())
    return out


def _labelled_items(source, like: dict[str, np.ndarray]) -> list[tuple[dict[str, np.ndarray], int]]:
    """The labelled eval data as (one example's inputs, label) items shaped ``like`` a calibration item (the
    static copy's shape: padded or cut to its length), for NNCF's validation dataset."""
    inputs, labels = source.eval_inputs, np.asarray(source.eval_labels)
    seq = next(iter(like.values())).shape[1]

    def fit(v):
        v = np.asarray(v)[:, :seq]
        return np.pad(v, [(0, 0), (0, seq - v.shape[1])]) if v.shape[1] < seq else v

    return [({k: fit(v[i: i + 1]).astype(like[k].dtype) for k, v in inputs.items()}, int(labels[i]))
            for i in range(len(labels))]


def _accuracy_fn():
    """NNCF's validation function: accuracy of a compiled model on (inputs, label) items, and per-item scores."""
    def validate(compiled, items) -> tuple[float, list[float]]:
        out = compiled.outputs[0]
        request = compiled.create_infer_request()
        hits = []
        for x, label in items:
            logits = request.infer(x)[out]
            hits.append(float(int(np.argmax(logits, axis=-1)[0]) == label))
        return float(np.mean(hits)), hits

    return validate
