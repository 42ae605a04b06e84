"""The step pipeline: apply steps in order, validate every stage against the reference, measure it,
and write it to its own folder. The output folder appears only when the whole run succeeded.

Layout of an output folder::

    OUT/
      report.json, report.md     every stage: validation, latency p50/p95, size, memory
      saved_model/               the final SavedModel (serving_default)
      stages/01-export/ ...      one folder per stage (.keras, SavedModel, .onnx)
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tfaccel.core.artifact import Artifact, kind_name
from tfaccel.core.chain import fit_to_consumers, run_step
from tfaccel.core.files import StagedOutput, link_tree
from tfaccel.core.measure import PeakRSS, check_shapes, check_shapes_fit
from tfaccel.core.report import Report, StageResult
from tfaccel.core.source import ModelSource
from tfaccel.core.step import Step
from tfaccel.core.timer import time_runner
from tfaccel.core.validation import BREACH_POLICIES, classification_accuracy, compare_outputs
from tfaccel.errors import ArgumentError, PlanError, ValidationError
from tfaccel.steps import get_step, producers_of, step_from_spec


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'AEIOU' else 'a'} {noun}"


def _is_quantized(step: Step, artifact: Artifact) -> bool:
    return step.quantized_output or bool(artifact.info.get("quantization"))


class Pipeline:
    """Apply steps in order to a model source and write the stages and a report.

    Each step starts from the artifact of the kind it consumes that the latest stage before it gave
    (the model as it came in, for the first): a Keras step from the latest Keras model, ``ort-int8``
    from the latest ONNX model. Two rules make branches:

    - ``STEP@FROM`` (a step name such as ``"litert-dynamic@export"``, or ``Step.start_from``) starts
      from the artifact of the latest step named FROM before it, or of the reference
      (``@reference``). FROM must come earlier and give the kind STEP consumes, else :meth:`plan`
      raises a PlanError before any work.
    - Without ``@``, a side-artifact step that converts a SavedModel (``onnx``, ``litert-dynamic``)
      starts from the latest *float* SavedModel: one not from a quantizing step (``int8``, ``int4``),
      so ``export,onnx,ort-int8,int8,litert-dynamic`` converts export's SavedModel, not the int8 one.
      Only when no float SavedModel exists does it take the latest (quantized) one; write
      ``litert-dynamic@int4`` to convert the int4 SavedModel on purpose. A conversion handed a
      quantized SavedModel it cannot convert (``Step.takes_quantized``: ``onnx`` and ``openvino``
      convert neither ``int8``'s nor ``int4``'s, ``litert-dynamic`` not ``int8``'s) is a PlanError
      before any work.

    Every stage in the report records its ``parent`` (the stage index it started from; report.md
    draws the tree).

    Args:
        steps: Step objects or step names, ``"name"`` or ``"name@from"`` (see :func:`tfaccel.available_steps`).
        shapes: (batch, sequence length) pairs to measure latency at.
        runs, warmup: timed and warm-up calls per shape.
        on_breach: default policy when a stage breaches its tolerance: "fail", "warn" or "skip".
        measure: set False to validate only (faster).
        log: callable receiving progress lines (default: stderr).
        footprints: with ``measure``, also load every SavedModel stage (and a ``model.export`` of the
            reference) in a fresh process for its resident memory: one child process each.
        memory_check: with ``measure``, refuse before any work a shape whose estimated memory exceeds
            what this machine has available (:func:`tfaccel.core.measure.check_shapes_fit`; the CLI's
            ``--skip-memory-check`` turns it off).

    Raises:
        ArgumentError: an argument of the wrong type or value (the message gives an example).

    Example:
        >>> from tfaccel import Pipeline, load_source
        >>> report = Pipeline(["export"], shapes=[(1, 16)], runs=3).run(load_source("bert-tiny"), "out")  # doctest: +SKIP
    """

    def __init__(
        self,
        steps: Sequence[Step | str],
        shapes: Sequence[tuple[int, int]] = ((1, 128),),
        runs: int = 20,
        warmup: int = 3,
        on_breach: str = "fail",
        measure: bool = True,
        max_seconds_per_shape: float = 60.0,
        log: Callable[[str], None] | None = None,
        footprints: bool = True,
        memory_check: bool = True,
    ):
        if on_breach not in BREACH_POLICIES:
            raise ArgumentError(f"on_breach must be one of {BREACH_POLICIES}. Received: on_breach={on_breach!r}")
        if isinstance(steps, (str, Step)) or not isinstance(steps, (list, tuple)):
            example = f"[{steps!r}]" if isinstance(steps, str) and "," not in steps else "['export', 'xla']"
            raise ArgumentError(f"steps is a list of step names or Step objects, e.g. steps={example}. "
                                f"Received: steps={steps!r}")
        if not steps:
            raise PlanError("No steps given. Pass at least one step, e.g. steps=['export'].")
        bad = [s for s in steps if not isinstance(s, (str, Step))]
        if bad:
            raise ArgumentError(f"Each of steps is a step name (see tfaccel.available_steps()) or a Step object, e.g. "
                                f"steps=['export', 'xla']. Received: {bad[0]!r} ({type(bad[0]).__name__})")
        self.steps = [step_from_spec(s) if isinstance(s, str) else s for s in steps]
        self.shapes = check_shapes(shapes)
        for name, value, low in (("runs", runs, 1), ("warmup", warmup, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ArgumentError(f"{name} is an int >= {low}, e.g. {name}={20 if low else 3}. "
                                    f"Received: {name}={value!r}")
        self.runs, self.warmup = runs, warmup
        self.on_breach = on_breach
        self.measure = measure
        self.max_seconds_per_shape = max_seconds_per_shape
        self.log = log or _default_log
        self.footprints = footprints
        self.memory_check = memory_check

    # ----------------------------------------------------------------------------------------------
    def plan(self, source: ModelSource) -> list[Step]:
        """Check that every step gets the artifact kind it consumes; append an export if the last
        Keras model would otherwise not reach a SavedModel. Raises PlanError before any work."""
        for step in self.steps:  # a step taking several artifact kinds (xla) picks the one this source gives
            step.bind(source)
        limit = source.max_sequence_length
        for batch, seq in self.shapes:
            if limit and seq > limit:
                raise PlanError(
                    f"Cannot measure at {batch}x{seq}: the model's maximum sequence length is {limit}. "
                    f"Use a sequence length of at most {limit} (--shape {batch}x{limit})."
                )
        if self.measure and self.memory_check:
            check_shapes_fit(source, self.shapes)
        have = {source.kind}
        latest_model_kind = source.kind
        start_index = self.start_indices(source)
        for i, step in enumerate(self.steps, 1):
            if i not in start_index and step.consumes not in have:  # STEP@FROM was checked by start_indices
                fix = {"saved_model": "add 'export' before it", "onnx": "add 'onnx' before it",
                       "keras": "start from a Keras model (.keras file, preset folder or example name)"}
                makers = producers_of(step.consumes)
                fix.setdefault(step.consumes, f"add {' or '.join(repr(m) for m in makers) or 'a step that makes one'}"
                                              " before it")
                raise PlanError(
                    f"Step {i} '{step.name}' needs a {kind_name(step.consumes)}, but nothing before it produces "
                    f"one (the source is a {kind_name(source.kind)}): {fix[step.consumes]}."
                )
            have.add(step.produces)
            if not step.side_artifact:
                latest_model_kind = step.produces
        _refuse_quantized_inputs(self.steps, start_index, source.kind)
        # A producer fitted to the steps that start from it (an onnx step feeding tensorrt writes standard ONNX)
        steps = fit_to_consumers(self.steps, {i - 1: None if j == 0 else j - 1
                                              for i, j in _planned_inputs(self.steps, start_index, source.kind).items()})
        for step in steps:  # every step can run here: checked before any work, not after the first stages
            step.check(source)
        if latest_model_kind == "keras":
            steps.append(get_step("export"))
        return steps

    def start_indices(self, source: ModelSource) -> dict[int, int]:
        """For each ``STEP@FROM`` step (1-based position): the position of the stage it starts from
        (0 = the reference). Raises PlanError naming the step and what it could start from when FROM
        is not an earlier step or gives the wrong kind of artifact."""
        out: dict[int, int] = {}
        names = [("reference", source.kind)] + [(s.name, s.produces) for s in self.steps]
        for i, step in enumerate(self.steps, 1):
            if not step.start_from:
                continue
            earlier = [(j, n, k) for j, (n, k) in enumerate(names[:i])]
            match = [j for j, n, _ in earlier if n == step.start_from]
            if not match:
                later = [j for j, (n, _) in enumerate(names) if j > i and n == step.start_from]
                where = (f"'{step.start_from}' is step {later[0]}, after it" if later
                         else f"there is no step '{step.start_from}' in the list")
                avail = ", ".join(f"{n} ({kind_name(k)})" for _, n, k in earlier)
                raise PlanError(
                    f"Step {i} '{step.spec}' starts from '{step.start_from}', but {where}. FROM must name an earlier "
                    f"step or 'reference'; before step {i} there are: {avail}."
                )
            j = match[-1]
            kind = names[j][1]
            if kind != step.consumes:
                fits = [f"{n}" + (f" (step {jj})" if jj else "") for jj, n, k in earlier if k == step.consumes]
                raise PlanError(
                    f"Step {i} '{step.spec}' starts from '{step.start_from}'" + (f" (step {j})" if j else "")
                    + f", which gives {_a(kind_name(kind))}; '{step.name}' needs {_a(kind_name(step.consumes))}. "
                    + (f"Stages before it that give one: {', '.join(fits)}." if fits
                       else f"No stage before it gives {_a(kind_name(step.consumes))}.")
                )
            out[i] = j
        return out

    # ----------------------------------------------------------------------------------------------
    def run(self, source: ModelSource, out_dir: str | os.PathLike, overwrite: bool = False) -> Report:
        """Run every step and write OUT. OUT appears (or replaces an old one, with ``overwrite``)
        only if the whole run succeeds; a failed run leaves no partial output.

        Raises:
            ArgumentError: ``source`` is not a ModelSource.
            OutputError: ``out_dir`` cannot be written or replaced (checked before any work).
            PlanError: the steps cannot run on this source (checked before any work).
        """
        if not isinstance(source, ModelSource):
            raise ArgumentError(f"source is a ModelSource, e.g. Pipeline(['export']).run(tfaccel.load_source("
                                f"'bert-tiny'), 'out'). Received: source={source!r} ({type(source).__name__})")
        staged = StagedOutput(out_dir, overwrite=overwrite, protect=[source.path], option="out_dir")
        staged.check()  # before the plan and any work
        steps = self.plan(source)
        with staged:
            report = self._run(source, steps, staged.path)
            report.write(staged.path)
            out = staged.commit()
        report.out_dir = str(out)
        self.log(f"wrote {out}/report.md and {out}/report.json")
        return report

    def _run(self, source: ModelSource, steps: list[Step], work: Path) -> Report:
        from tfaccel.compat import capabilities

        t_run = time.perf_counter()
        caps = capabilities()
        report = Report(
            source=source.name, task=source.task,
            source_description=" ".join([source.description.strip()] + [  # the user's data files, if any
                f"{what.capitalize()} data: {desc}." for what, desc in source.data_files.items()]).strip(),
            shapes=[list(s) for s in self.shapes], capabilities=caps.to_dict(),
        )
        reference = Artifact.of_source(source)
        self.log(f"[0/{len(steps)}] reference: {source.name} ({source.kind})")
        ref_stage = StageResult(index=0, step="reference", kind=source.kind, path=None, params={},
                                size_bytes=reference.size_bytes(), status="ok")
        with PeakRSS() as mem:
            ref_runner = reference.runner()
            ref_out = ref_runner(source.sample_inputs)
            ref_acc = None
            if source.eval_labels is not None and source.task == "classification":
                ref_acc = classification_accuracy(ref_runner, source.eval_inputs, source.eval_labels)
                self.log(f"  reference accuracy {ref_acc:.4f} on {len(source.eval_labels)} held-out examples")
            self._measure(source, ref_runner, ref_stage)
        ref_stage.accuracy = ref_acc
        ref_stage.peak_memory_bytes = mem.growth
        report.stages.append(ref_stage)
        del ref_runner

        latest: dict[str, Artifact] = {source.kind: reference}
        # The latest float (not quantized) SavedModel: where onnx / litert-dynamic start by default.
        latest_float: Artifact | None = reference if source.kind == "saved_model" else None
        done: dict[int, Artifact] = {0: reference}  # stage index -> artifact, for the stages that were kept
        index_of = {id(reference): 0}
        outputs_of = {id(reference): (ref_out, ref_acc)}  # artifact -> (sample outputs, accuracy)
        final_saved_model: Path | None = source.path and Path(source.path) if source.kind == "saved_model" else None
        start_index = self.start_indices(source)
        for i, step in enumerate(steps, 1):
            label = f"[{i}/{len(steps)}] {step.spec}"
            self.log(f"{label}: {kind_name(step.consumes)} -> {kind_name(step.produces)}")
            parent = _input_stage(i, step, start_index, latest, latest_float, done.get)
            if parent is None:  # the stage that would have made its input was skipped
                self.log(f"  skipped: no {kind_name(step.consumes)} (the stage producing it was skipped)")
                report.stages.append(StageResult(
                    index=i, step=step.name, kind=step.produces, path=None, params=step.params(), status="skipped",
                    notes=[f"not run: its input ({kind_name(step.consumes)}) was skipped"],
                    parent=start_index.get(i)))
                continue
            parent_index = index_of[id(parent)]
            if parent_index != i - 1:
                self.log(f"  starts from stage {parent_index} ({report.stages[parent_index].step})")
            stage_name = f"{i:02d}-{step.name}"
            partial = work / "stages" / f".{stage_name}.partial"
            run = run_step(step, parent, source, partial, log=self.log, shapes=self.shapes)
            artifact, seconds = run.artifact, run.seconds
            final_dir = work / "stages" / stage_name
            os.replace(partial, final_dir)
            if artifact.path:
                artifact.path = str(final_dir / Path(artifact.path).relative_to(partial))
            self.log(f"  built in {seconds:.1f}s")

            stage = StageResult(index=i, step=step.name, kind=artifact.kind,
                                path=str(final_dir.relative_to(work)) if artifact.path else None,
                                params=step.params(), build_seconds=seconds, size_bytes=artifact.size_bytes(),
                                tolerance=step.tolerance.get_config(), notes=run.notes, parent=parent_index)
            policy = step.on_breach or self.on_breach
            in_out, in_acc = outputs_of[id(parent)]
            with PeakRSS() as mem:
                runner = artifact.runner()
                out = runner(source.sample_inputs)
                acc = None
                if ref_acc is not None:
                    acc = classification_accuracy(runner, source.eval_inputs, source.eval_labels)
                comp = compare_outputs(ref_out, out)  # cumulative drift: what the report shows
                comp.reference_accuracy, comp.accuracy = ref_acc, acc
                own = compare_outputs(in_out, out)  # this step's own effect: what its tolerance bounds
                own.reference_accuracy, own.accuracy = in_acc, acc
                stage.accuracy = acc
                self.log(f"  vs reference: max abs diff {comp.max_abs_diff:.3g}, cosine {comp.min_cosine:.6f}"
                         + (f", accuracy {acc:.4f}" if acc is not None else ""))
                breaches = own.breaches(step.tolerance)
                if not breaches or policy == "warn":
                    self._measure(source, runner, stage)
                    if run.hardware_warning:
                        self._note_measured_slowdown(run.hardware_warning, stage, report.stages[parent_index])
                if hasattr(runner, "stats"):  # e.g. XLA compilations the stage caused
                    stage.runner_stats = runner.stats()
                    self.log(f"  {stage.runner_stats}")
                del runner
            stage.peak_memory_bytes = mem.growth
            stage.comparison = comp.to_dict()
            stage.step_comparison = own.to_dict()
            if breaches:
                msg = (f"Stage '{step.name}' breached its tolerance (against its input, "
                       + ("the reference" if parent is reference else "the stage before" if parent_index == i - 1
                          else f"stage {parent_index} '{report.stages[parent_index].step}'") + "): "
                       + "; ".join(breaches))
                if policy == "fail":
                    raise ValidationError(
                        msg + ". Loosen the step's tolerance, or rerun with --on-breach warn (keep it, flagged) "
                        "or --on-breach skip (drop the stage)."
                    )
                stage.breaches = breaches
                if policy == "skip":
                    self.log(f"  {msg}: skipped")
                    stage.status = "skipped"
                    shutil.rmtree(final_dir)
                    stage.path = None
                    report.stages.append(stage)
                    continue
                self.log(f"  WARNING {msg}")
                stage.status = "breach"
            report.stages.append(stage)
            latest[artifact.kind] = artifact
            if artifact.kind == "saved_model" and not _is_quantized(step, artifact):
                latest_float = artifact
            done[i] = artifact
            index_of[id(artifact)] = i
            outputs_of[id(artifact)] = (out, acc)
            if artifact.kind == "saved_model" and not step.side_artifact:
                final_saved_model = final_dir
        if final_saved_model is not None and final_saved_model.is_relative_to(work):
            link_tree(final_saved_model, work / "saved_model")
            report.final_saved_model = "saved_model"
        elif final_saved_model is not None:  # the source itself was a SavedModel and no step replaced it
            report.final_saved_model = str(final_saved_model)
        if self.measure and self.footprints:  # every SavedModel's size and memory after loading, vs model.export
            from tfaccel.saved_model import add_load_footprints

            add_load_footprints(report, source, work, log=self.log)
        report.total_seconds = time.perf_counter() - t_run
        return report

    def _measure(self, source: ModelSource, runner, stage: StageResult) -> None:
        if not self.measure:
            return
        for batch, seq in self.shapes:
            inputs = source.make_inputs(batch, seq)
            m = time_runner(runner, inputs, warmup=self.warmup, runs=self.runs,
                            max_seconds=self.max_seconds_per_shape, seq=seq)
            stage.measurements.append(m.to_dict())
            self.log(f"  batch {batch} x seq {seq}: p50 {m.p50_ms:.1f} ms, p95 {m.p95_ms:.1f} ms, "
                     f"{m.throughput:.1f} samples/s")

    def _note_measured_slowdown(self, warning: str, stage: StageResult, parent: StageResult) -> None:
        """Add the measured speed against the stage's input, shape by shape, to a hardware warning."""
        before = {(m["batch"], m["seq"]): m["p50_ms"] for m in parent.measurements}
        ratios = [f"{m['batch']}x{m['seq']}: {before[(m['batch'], m['seq'])] / m['p50_ms']:.2f}x its input's speed"
                  for m in stage.measurements if before.get((m["batch"], m["seq"])) and m["p50_ms"]]
        if ratios:
            note = f"measured on this machine ({warning}): " + ", ".join(ratios)
            stage.notes.append(note)
            self.log(f"  note: {note}")

def _input_stage(i: int, step: Step, start_index: dict[int, int], latest: dict, latest_float, at: Callable):
    """The stage step ``i`` (1-based) starts from: its ``FROM``, else the latest float SavedModel for a side step
    that converts one, else the latest stage of the kind it consumes; None where there is none. A stage is what the
    caller tracks stages by (positions when planning, artifacts when running); ``at(position)`` gives the FROM one."""
    if i in start_index:
        return at(start_index[i])
    if step.side_artifact and step.consumes == "saved_model" and latest_float is not None:
        return latest_float
    return latest.get(step.consumes)


def _planned_inputs(steps: Sequence[Step], start_index: dict[int, int], source_kind: str) -> dict[int, int]:
    """For each step (1-based position), the position of the stage it starts from (0 = the reference) when no
    stage is skipped (:func:`_input_stage`, the rule :meth:`Pipeline._run` follows; a SavedModel counts as
    quantized here by its step alone)."""
    latest = {source_kind: 0}
    latest_float = 0 if source_kind == "saved_model" else None
    out = {}
    for i, step in enumerate(steps, 1):
        j = _input_stage(i, step, start_index, latest, latest_float, lambda position: position)
        if j is not None:
            out[i] = j
        latest[step.produces] = i
        if step.produces == "saved_model" and not step.quantized_output:
            latest_float = i
    return out


def _refuse_quantized_inputs(steps: list[Step], start_index: dict[int, int], source_kind: str) -> None:
    """PlanError for a step that converts a SavedModel (``Step.takes_quantized`` set: onnx, litert-dynamic,
    openvino) when the SavedModel it would start from is a quantizing step's (int8, int4) it cannot take."""
    for i, step in enumerate(steps, 1):
        if step.takes_quantized is None or step.consumes != "saved_model":
            continue
        makers = [s for s in steps[: i - 1] if s.produces == "saved_model"]
        if i in start_index:
            maker = steps[start_index[i] - 1] if start_index[i] > 0 else None
        elif step.side_artifact:  # the latest float SavedModel (a SavedModel source is one), else the latest
            float_before = source_kind == "saved_model" or not all(s.quantized_output for s in makers)
            maker = None if float_before or not makers else makers[-1]
        else:
            maker = makers[-1] if makers else None
        if maker is None or not maker.quantized_output or maker.name in step.takes_quantized:
            continue
        floats = [s.name for s in makers if not s.quantized_output]
        fix = (f"Start it from a float SavedModel ({step.name}@{floats[-1]})" if floats else
               f"Add 'export' before '{maker.name}' (e.g. --steps export,{maker.name},{step.name})")
        reason = f" ({step.quantized_input_reason})" if step.quantized_input_reason else ""
        raise PlanError(f"Step {i} '{step.spec}' would convert the SavedModel of '{maker.name}', which is quantized: "
                        f"'{step.name}' cannot convert it{reason}. {fix}.")
