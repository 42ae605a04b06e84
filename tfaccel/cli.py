"""The `tfaccel` command line. Thin: it parses arguments and calls the library.

    tfaccel env [--json]
    tfaccel steps
    tfaccel optimize MODEL --steps export,onnx --out DIR [--shape 1x128 ...]
    tfaccel optimize MODEL --auto [--max-accuracy-drop 1.0] [--formats savedmodel|all] [--time-budget S] --out DIR
    tfaccel optimize CAUSAL_LM --auto [--shape 1x32+64] [--max-perplexity-ratio 1.01] [--max-kl 0.01] --out DIR
    tfaccel bench MODEL_OR_ARTIFACT [--shape 1x128 ...]
    tfaccel serve-check SAVED_MODEL_DIR
    tfaccel generate ARTIFACT --prompt-ids 1,2,3 [--max-new-tokens N] [--stop-token-id T] [--threads N]
    tfaccel train-workers N [--max-restarts K] -- python train.py ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

EXIT_UNEXPECTED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT; a SIGTERM exits 128 + 15


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _quiet_tf(verbose: bool = False) -> None:
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # leave GPU memory for TensorRT


# What TensorFlow's native code writes to stderr while it starts, whatever TF_CPP_MIN_LOG_LEVEL says (absl
# logs before absl::InitializeLog, the CUDA probes): "W0000 00:00:1796532776.107717   19749 file.cc:31] ...".
_NATIVE_LOG_LINE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
                              r"STDERR|[IWEF]\d{4} [\d:.]+\s+\d+ [\w.\-]+:\d+\] .*)$")


def _load_tensorflow_quietly(verbose: bool) -> None:
    """Import TensorFlow and probe its devices with the native stderr captured, then pass on only the lines
    that are not its start-up logs (the oneDNN note, "Could not find cuda drivers", "failed call to
    cuInit"...). With --verbose nothing is hidden."""
    if verbose or "tensorflow" in sys.modules:
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # the CUDA probe logs at the first device query
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = [ln for ln in text.splitlines() if ln.strip() and not _NATIVE_LOG_LINE.match(ln)]
            if kept:  # anything else TensorFlow said (a warning, an import error's output) is passed on
                print("\n".join(kept), file=sys.stderr, flush=True)


class UsageError(ValueError):
    """A bad combination or value of CLI options (exit 2); raised before any model is loaded."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _check_count(args, flag: str, low: int, why: str = "") -> None:
    value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    if value is not None:
        _require(value >= low, f"{flag} must be at least {low}{why}. Received: {flag} {value}")


def _check_number(args, flag: str, *, allow_inf: bool = False) -> None:
    value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    if value is None:
        return
    _require(not math.isnan(value) and (allow_inf or math.isfinite(value)) and value >= 0,
             f"{flag} must be a number >= 0{' (inf: no limit)' if allow_inf else ''}. Received: {flag} {value}")


def _check_files_exist(args) -> None:
    for flag in ("--inputs", "--eval-data", "--eval-texts", "--calibration-data", "--train-data"):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None and not os.path.isfile(value):
            what = "is a folder, not a file" if os.path.isdir(value) else "does not exist"
            raise UsageError(f"{flag} {value!r} {what}. Give the path of the data file.")


def _check_out(args) -> None:
    """--out can be written (or replaced with --overwrite, never over the model), checked before the model
    is loaded; Pipeline.run / optimize_auto check it again once the model's own path is known."""
    from tfaccel.core.files import StagedOutput

    protect = [args.model] if os.path.exists(args.model) else []
    StagedOutput(args.out, overwrite=args.overwrite, protect=protect).check()


def cmd_env(args) -> int:
    from tfaccel.compat import capabilities

    _load_tensorflow_quietly(args.verbose)
    caps = capabilities()
    print(json.dumps(caps.to_dict(), indent=2) if args.json else caps.format_text())
    return 0


def cmd_steps(args) -> int:
    from tfaccel.examples import list_examples
    from tfaccel.steps import available_steps

    print("steps:")
    for name, desc in available_steps().items():
        print(f"  {name:16s} {desc}")
    print("built-in examples (MODEL):")
    for name, desc in list_examples().items():
        print(f"  {name:16s} {desc}")
    return 0


def _parse_shapes(values):
    from tfaccel.core.measure import parse_shape

    return [parse_shape(v) for v in (values or [])]


def _parse_step_options(values):
    """--set onnx.opset=17 -> {"onnx": {"opset": 17}}."""
    out: dict[str, dict] = {}
    for v in values or []:
        try:
            key, raw = v.split("=", 1)
            step, opt = key.split(".", 1)
        except ValueError:
            raise UsageError(f"--set takes STEP.OPTION=VALUE, e.g. --set onnx.opset=17. Received: {v!r}") from None
        try:
            val = json.loads(raw)
        except ValueError:
            val = raw
        out.setdefault(step, {})[opt.replace("-", "_")] = val
    return out


#: Steps whose calibration reads --calibration-data (int8 engines; GPTQ / AWQ on a causal LM's text).
_CALIBRATING_STEPS = ("tftrt", "tensorrt", "ov-int8", "gptq", "awq")


def _data_options(args, names: list[str], options: dict[str, dict]) -> str | None:
    """Check the data-file options against --steps; give --train-data to prune-structured as data=.
    Returns the eval file (--eval-data or --eval-texts)."""
    from tfaccel.core.eval_data import NPZ_SUFFIXES, TEXT_SUFFIXES
    from tfaccel.core.step import parse_step_spec

    if args.eval_data and args.eval_texts:
        raise UsageError("Pass either --eval-data (an .npz) or --eval-texts (a .csv / .jsonl), not both.")
    if args.eval_data and args.eval_data.lower().endswith(TEXT_SUFFIXES):
        raise UsageError(f"--eval-data takes an .npz of model inputs plus 'labels'; for texts ({args.eval_data!r}) "
                         "use --eval-texts.")
    if args.eval_texts and args.eval_texts.lower().endswith(NPZ_SUFFIXES):
        raise UsageError(f"--eval-texts takes a .csv or .jsonl of texts; for an .npz ({args.eval_texts!r}) use "
                         "--eval-data.")
    bases = [parse_step_spec(n)[0] for n in names]
    if args.calibration_data and not set(bases) & set(_CALIBRATING_STEPS):
        raise UsageError(f"--calibration-data is read by the int8 calibration of {', '.join(_CALIBRATING_STEPS)}; "
                         "none of them is in --steps.")
    if args.train_data:
        pruning = [n for n, b in zip(names, bases, strict=True) if b == "prune-structured"]
        if not pruning:
            raise UsageError("--train-data is prune-structured's fine-tuning data; add prune-structured to --steps.")
        if any("data" in options.get(k, {}) for k in ("prune-structured", *pruning)):
            raise UsageError("Pass the fine-tuning data once: --train-data or --set prune-structured.data=..., not both.")
        options.setdefault("prune-structured", {})["data"] = args.train_data
    return args.eval_data or args.eval_texts


_AUTO_ONLY = {"max_accuracy_drop": "--max-accuracy-drop", "formats": "--formats", "time_budget": "--time-budget",
              "max_perplexity_ratio": "--max-perplexity-ratio", "max_kl": "--max-kl"}


def _check_optimize_args(args) -> None:
    """Every option of `tfaccel optimize` that can be checked without the model, before it is loaded."""
    if args.auto:
        _require(args.steps is None, "--auto and --steps are mutually exclusive: --auto chooses the steps itself "
                                     "from the recipe table; pass one of them.")
        _require(not (args.set or args.on_breach != "fail" or args.no_measure),
                 "--set, --on-breach and --no-measure apply to --steps runs; --auto validates and times every "
                 "candidate itself (see --max-accuracy-drop).")
        _check_count(args, "--runs", 3, " (a median needs a few calls)")
        _check_count(args, "--warmup", 1, " (the first call traces and compiles)")
        _check_number(args, "--max-accuracy-drop")
        _check_number(args, "--time-budget", allow_inf=True)
        _check_number(args, "--max-perplexity-ratio")
        _check_number(args, "--max-kl")
    else:
        _require(args.steps is not None, "optimize needs --steps STEP,STEP,... (e.g. --steps export,onnx) or --auto.")
        _require(any(s.strip() for s in args.steps.split(",")), "--steps is empty; name at least one step, e.g. "
                                                                 "--steps export (tfaccel steps lists them).")
        given = [flag for key, flag in _AUTO_ONLY.items() if getattr(args, key) is not None]
        _require(not given, f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --auto; "
                            "--steps runs use each step's own tolerance.")
        _check_count(args, "--runs", 1)
        _check_count(args, "--warmup", 0)
    _check_count(args, "--num-classes", 1)
    if args.auto and any("+" in v for v in (args.shape or [])):  # a causal LM's generations: BATCHxPROMPT+NEW
        from tfaccel.auto.generation_search import parse_generation_shape

        for v in args.shape:
            parse_generation_shape(v)
    else:
        _parse_shapes(args.shape)
    _check_files_exist(args)
    _check_out(args)


def cmd_optimize_auto(args) -> int:
    """`tfaccel optimize MODEL --auto`: tfaccel.auto.optimize_auto, then the ranked table on stdout."""
    from tfaccel.auto.auto_report import ranked_table
    from tfaccel.auto.search import DEFAULT_TIME_BUDGET_S, optimize_auto
    from tfaccel.sources import load_source

    data = {k: getattr(args, k, None) for k in ("eval_data", "eval_texts", "calibration_data")}
    kwargs = {"eval_data": data["eval_data"] or data["eval_texts"]} if data["eval_data"] or data["eval_texts"] else {}
    if data["calibration_data"]:
        kwargs["calibration_data"] = data["calibration_data"]
    _load_tensorflow_quietly(args.verbose)
    source = load_source(args.model, task=args.task, num_classes=args.num_classes, sample_inputs=args.inputs,
                         progress=_log, **kwargs)
    budget = DEFAULT_TIME_BUDGET_S if args.time_budget is None else args.time_budget
    causal = source.task == "causal_lm" and source.kind == "keras"
    if causal:  # generation: BATCHxPROMPT+NEW shapes, a budget on held-out text
        from tfaccel.auto.generation_search import parse_generation_shape

        _require(args.max_accuracy_drop is None, "--max-accuracy-drop judges classifiers; a causal LM's --auto "
                                                 "budget is --max-perplexity-ratio / --max-kl on held-out text.")
        shapes = [parse_generation_shape(v) for v in (args.shape or [])] or None
        generation = {k: v for k, v in (("max_perplexity_ratio", args.max_perplexity_ratio),
                                        ("max_kl", args.max_kl)) if v is not None}
        # whole generations: at most 5 timed and 1 untimed per candidate and shape (the defaults 20 / 3 are
        # forward-pass counts)
        generation.update(runs=min(args.runs, 5), warmup=min(args.warmup, 1))
        runs, warmup = args.runs, args.warmup
    else:
        _require(args.max_perplexity_ratio is None and args.max_kl is None,
                 "--max-perplexity-ratio / --max-kl judge a causal LM's generation on held-out text; "
                 f"{source.name} is a {source.task} model (see --max-accuracy-drop).")
        shapes, generation, runs, warmup = _parse_shapes(args.shape) or None, None, args.runs, args.warmup
    report = optimize_auto(
        source, args.out, shapes=shapes, formats=args.formats,
        max_accuracy_drop=1.0 if args.max_accuracy_drop is None else args.max_accuracy_drop,
        time_budget_s=None if math.isinf(budget) else budget,
        finetune_data=getattr(args, "train_data", None), runs=runs, warmup=warmup,
        overwrite=args.overwrite, memory_check=not args.skip_memory_check, log=_log, generation=generation)
    print("\n".join(report.table_lines() if causal else ranked_table(report)))
    print(f"\n{'saved_model' if causal else 'Winner'}: {report.winner} -> {report.final_saved_model_path}"
          + (f"; fastest of any format: {report.fastest_artifact} -> {report.out_dir}/{report.fastest_artifact_path}"
             if report.fastest_artifact != report.winner else "")
          + f". Report: {report.out_dir}/report.md")
    return 0


def cmd_optimize(args) -> int:
    _check_optimize_args(args)
    if args.auto:
        return cmd_optimize_auto(args)
    from tfaccel.core.step import parse_step_spec
    from tfaccel.pipeline import Pipeline
    from tfaccel.sources import load_source
    from tfaccel.steps import step_from_spec

    names = [s.strip() for s in args.steps.split(",") if s.strip()]
    options = _parse_step_options(args.set)
    # --set STEP.OPTION applies to every STEP in --steps, STEP@FROM ones included; --set STEP@FROM.OPTION
    # only to that one (and wins over STEP.OPTION).
    unknown = set(options) - set(names) - {parse_step_spec(n)[0] for n in names}
    if unknown:
        raise UsageError(f"--set names steps that are not in --steps: {', '.join(sorted(unknown))} (--steps "
                         f"{args.steps}).")
    eval_file = _data_options(args, names, options)
    steps = [step_from_spec(n, **{**options.get(parse_step_spec(n)[0], {}), **options.get(n, {})}) for n in names]
    _load_tensorflow_quietly(args.verbose)
    source = load_source(args.model, task=args.task, num_classes=args.num_classes, sample_inputs=args.inputs,
                         progress=_log, eval_data=eval_file, calibration_data=args.calibration_data)
    shapes = _parse_shapes(args.shape) or [(1, source.default_seq)]
    pipe = Pipeline(steps, shapes=shapes, runs=args.runs, warmup=args.warmup, on_breach=args.on_breach,
                    measure=not args.no_measure, memory_check=not args.skip_memory_check, log=_log)
    report = pipe.run(source, args.out, overwrite=args.overwrite)
    print(report.to_markdown())
    return 0


def cmd_bench(args) -> int:
    from tfaccel.core.artifact import Artifact
    from tfaccel.core.measure import PeakRSS, check_shapes_fit
    from tfaccel.core.timer import time_runner
    from tfaccel.sources import load_source

    _check_count(args, "--runs", 1)
    _check_count(args, "--warmup", 0)
    _check_count(args, "--num-classes", 1)
    _parse_shapes(args.shape)
    target = args.model
    from tfaccel.openvino.ir import is_ir

    if isinstance(target, str) and is_ir(target):
        artifact = Artifact(kind="openvino", path=target)
        runner = artifact.runner()
        from tfaccel.sources import InputSpec, ModelSource

        specs = [InputSpec(name, "int32", (None, None)) for name in runner.input_types]
        source = ModelSource(name=target, kind="openvino", input_specs=specs, sample_inputs={}, vocab_size=100)
    elif isinstance(target, str) and target.endswith(".onnx"):
        from tfaccel.errors import SourceError

        if not os.path.isfile(target):
            raise SourceError(f"{target!r} does not exist. Give the path of an .onnx file.")
        artifact = Artifact(kind="onnx", path=target)
        runner = artifact.runner()
        from tfaccel.core.source import InputSpec, ModelSource

        specs = [InputSpec(i.name, "int32" if "int" in i.type else "float32", (None, None))
                 for i in runner.session.get_inputs()]
        source = ModelSource(name=target, kind="onnx", input_specs=specs, sample_inputs={}, vocab_size=100)
    else:
        _load_tensorflow_quietly(args.verbose)
        source = load_source(target, task=args.task, num_classes=args.num_classes, progress=_log)
        artifact = Artifact.of_source(source)
        runner = None
    shapes = _parse_shapes(args.shape) or [(1, source.default_seq)]
    if not args.skip_memory_check:
        check_shapes_fit(source, shapes)
    rows = []
    with PeakRSS() as mem:
        runner = runner or artifact.runner()
        for batch, seq in shapes:
            m = time_runner(runner, source.make_inputs(batch, seq), warmup=args.warmup, runs=args.runs, seq=seq)
            rows.append(m.to_dict())
            _log(f"batch {batch} x seq {seq}: p50 {m.p50_ms:.1f} ms")
    result = {"model": target, "kind": artifact.kind, "size_bytes": artifact.size_bytes(),
              "peak_memory_bytes": mem.growth, "measurements": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{target} ({artifact.kind}, {result['size_bytes'] / 1e6:.1f} MB)")
        print("| batch x seq | p50 ms | p95 ms | samples/s | first call ms |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['batch']}x{r['seq']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['throughput']:.1f} | "
                  f"{r['first_call_ms']:.0f} |")
    return 0


def cmd_serve_check(args) -> int:
    from tfaccel.openvino.ir import is_ir
    from tfaccel.servable import check_servable

    if is_ir(args.saved_model):
        from tfaccel.openvino.serve import check_openvino_servable

        result = check_openvino_servable(args.saved_model)
        shapes = {k: v.shape for k, v in result["outputs"].items()}
        print(f"OK: {args.saved_model} compiles and runs with OpenVINO alone in a fresh process (no tfaccel, no "
              f"TensorFlow; {result['config']['INFERENCE_PRECISION_HINT']}) and agrees with tfaccel; outputs {shapes}")
        return 0
    result = check_servable(args.saved_model)
    shapes = {k: v.shape for k, v in result["outputs"].items()}
    print(f"OK: {args.saved_model} loads and runs without tfaccel (tf.saved_model.load in a fresh process and "
          f"saved_model_cli run agree); outputs {shapes}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tfaccel import __version__

    p = argparse.ArgumentParser(
        prog="tfaccel", description=__doc__.split("\n")[0],
        epilog="Exit codes: 0 success; 2 a problem with the input (one line naming it and the fix); 1 an "
               "unexpected error (one line naming it and the log file with the traceback: tfaccel-error-*.log "
               "beside --out, or in $TMPDIR); 130 / 143 stopped by Ctrl-C / SIGTERM (nothing half-written is left).")
    p.add_argument("--version", action="version", version=f"tfaccel {__version__}")
    p.add_argument("--verbose", action="store_true", dest="verbose_global", help=argparse.SUPPRESS)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up logs, and the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)  # --verbose on every command

    e = command("env", help="what this machine and TensorFlow build can do")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=cmd_env)

    s = command("steps", help="list pipeline steps and built-in example models")
    s.set_defaults(func=cmd_steps)

    def model_args(sp):
        sp.add_argument("model", help="example name (minilm-bbc, bert-base, gpt2-small, gpt2-bbc, llama-small, bert-tiny, gpt2-tiny), "
                                       ".keras file, keras-hub preset / Hugging Face folder, or SavedModel folder")
        sp.add_argument("--task", choices=["backbone", "classification", "causal_lm"],
                        help="how to load a preset folder (default: backbone)")
        sp.add_argument("--num-classes", type=int, help="classes, for --task classification")
        sp.add_argument("--shape", action="append", metavar="BATCHxSEQ",
                        help="measure at this batch x sequence length; repeatable (default 1x128). --auto on a causal "
                             "LM: BATCHxPROMPT+NEW whole generations, e.g. 1x32+64 (the default) and 8x32+64")
        sp.add_argument("--runs", type=int, default=20, help="timed runs per shape (default 20)")
        sp.add_argument("--warmup", type=int, default=3, help="warm-up runs per shape (default 3)")
        sp.add_argument("--skip-memory-check", action="store_true",
                        help="try every --shape even when its estimated memory exceeds what this machine has "
                             "available (by default such a shape is refused before any work)")

    o = command("optimize", help="apply steps, validate and measure each, write stages and a report")
    model_args(o)
    o.add_argument("--steps",
                   help="comma-separated steps, e.g. export,onnx,ort-int8; STEP@FROM starts a step from an earlier "
                        "step's artifact (litert-dynamic@export) or the model (@reference)")
    o.add_argument("--out", required=True, help="output folder (created only if the run succeeds)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out, only on success and only if tfaccel wrote it (or it is empty); "
                        "never a file, the current folder or one of its parents, or the model itself")
    o.add_argument("--on-breach", choices=["fail", "warn", "skip"], default="fail",
                   help="when a stage breaches its tolerance: fail (default), warn (keep, flag), skip (drop)")
    o.add_argument("--inputs", help=".npz of sample inputs to validate on (one array per input name)")
    o.add_argument("--set", action="append", metavar="STEP.OPTION=VALUE",
                   help="step option, e.g. onnx.opset=17 (applies to STEP@FROM steps too)")
    o.add_argument("--eval-data", metavar="FILE.npz",
                   help="your labelled eval data: one array per model input plus 'labels'; every stage's accuracy "
                        "is measured on it and each step's accuracy budget applies")
    o.add_argument("--eval-texts", metavar="FILE",
                   help="your labelled texts ('text', 'label' in .csv / .jsonl), tokenized with the model's tokenizer "
                        "(preset / Hugging Face folder); used like --eval-data. For a causal LM: held-out text "
                        "(.txt, .jsonl / .csv with 'text') that generation steps measure perplexity and KL on")
    o.add_argument("--calibration-data", metavar="FILE",
                   help="int8 calibration data for tftrt / tensorrt / ov-int8 (.npz of inputs, or .csv / .jsonl "
                        "texts); for a causal LM, gptq / awq calibration text (.txt / .jsonl / .csv, or .npz of "
                        "token_ids)")
    o.add_argument("--train-data", metavar="FILE",
                   help="prune-structured's fine-tuning data (.npz of inputs with optional 'labels', or texts)")
    o.add_argument("--no-measure", action="store_true", help="validate only, skip latency measurement")
    o.add_argument("--auto", action="store_true",
                   help="instead of --steps: build every recipe this machine can run, validate each within "
                        "--max-accuracy-drop, time them interleaved at --shape, keep the fastest SavedModel")
    o.add_argument("--max-accuracy-drop", type=float, metavar="POINTS",
                   help="--auto: accuracy points the result may lose on the labelled eval data (default 1.0)")
    o.add_argument("--formats", choices=["savedmodel", "all"],
                   help="--auto: SavedModel candidates only (the default), or also OpenVINO/ONNX/LiteRT/TensorRT side "
                        "artifacts (the default for a causal LM, whose decoders are ONNX)")
    o.add_argument("--max-perplexity-ratio", type=float, metavar="RATIO",
                   help="--auto on a causal LM: the largest perplexity ratio to the Keras model on held-out text "
                        "(default 1.01)")
    o.add_argument("--max-kl", type=float, metavar="NATS",
                   help="--auto on a causal LM: the largest mean KL divergence of the next-token distributions on "
                        "held-out text (default 0.01)")
    o.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="--auto: seconds for the whole search (default 540; 'inf': no limit); candidates that "
                        "would not fit are not tried, and the report says so")
    o.set_defaults(func=cmd_optimize)

    c = command("serve-check", help="check a SavedModel loads and runs without tfaccel (saved_model_cli), or an "
                                        "OpenVINO IR with OpenVINO alone")
    c.add_argument("saved_model", help="SavedModel folder, or OpenVINO IR folder / .xml")
    c.set_defaults(func=cmd_serve_check)

    b = command("bench", help="measure latency of a model or artifact (.onnx and OpenVINO IR too)")
    model_args(b)
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=cmd_bench)

    g = command("generate", help="greedy generation with a generation artifact (generate SavedModel, ONNX "
                                        "or TensorRT decoder folder)")
    g.add_argument("artifact", help="SavedModel from the generate step, or a decoder folder (onnx-decoder, "
                                    "ort-decoder-int8/int4, tensorrt-decoder)")
    g.add_argument("--prompt-ids", action="append", required=True, metavar="1,2,3",
                   help="a prompt as comma-separated token ids; repeat for a batch")
    g.add_argument("--max-new-tokens", type=int, default=16, help="tokens to add after each prompt (default 16)")
    g.add_argument("--stop-token-id", type=int, default=-1, help="a row ends after this id (default -1: never)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="ONNX decoders: onnxruntime intra-op threads (default 0: all cores; 1 was faster on a "
                        "loaded 2-core machine)")
    g.add_argument("--spin", action="store_true",
                   help="ONNX decoders: let idle onnxruntime threads spin (fastest only when nothing else runs)")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.set_defaults(func=cmd_generate)

    # Parsed by tfaccel.distribute.launcher (everything after "--" is the worker command); listed here for --help.
    command("train-workers", add_help=False,
                   help="run N local MultiWorkerMirroredStrategy workers (TF_CONFIG on loopback ports), "
                        "restarting any that die: tfaccel train-workers 2 -- python train.py")
    return p


def cmd_generate(args) -> int:
    from tfaccel.generation import load_generator
    from tfaccel.generation.generators import artifact_kind, vocabulary_size_of
    from tfaccel.generation.prompts import check_stop_token_id, parse_prompt_ids, prepare_prompts

    _check_count(args, "--max-new-tokens", 1)
    _check_count(args, "--stop-token-id", -1, " (-1: never stop)")
    _check_count(args, "--threads", 0, " (0: all cores)")
    prompts = parse_prompt_ids(args.prompt_ids)
    options = {} if args.threads is None else {"intra_op_threads": args.threads}
    if args.spin:
        options["spinning"] = True
    if options and artifact_kind(args.artifact) != "onnx_decoder":
        flags = [f for f, k in (("--threads", "intra_op_threads"), ("--spin", "spinning")) if k in options]
        raise UsageError(f"{' and '.join(flags)} {'applies' if len(flags) == 1 else 'apply'} only to ONNX decoders "
                         f"(onnxruntime's threads); {args.artifact} is a {artifact_kind(args.artifact)}. Drop "
                         f"{'it' if len(flags) == 1 else 'them'}.")
    vocab = vocabulary_size_of(args.artifact)  # token ids checked before the artifact is loaded
    prepare_prompts(prompts, vocabulary_size=vocab, max_new_tokens=args.max_new_tokens)
    check_stop_token_id(args.stop_token_id, vocab)
    if artifact_kind(args.artifact) == "saved_model":
        _load_tensorflow_quietly(args.verbose)
    gen = load_generator(args.artifact, **options)
    t0 = time.perf_counter()
    result = gen.generate(prompts, args.max_new_tokens, args.stop_token_id)
    seconds = time.perf_counter() - t0
    new = result.new_tokens([len(p) for p in prompts])
    if args.json:
        print(json.dumps({"artifact": gen.kind, "new_token_ids": new, "lengths": result.lengths.tolist(),
                          "seconds": round(seconds, 4)}))
    else:
        for row in new:
            print(",".join(str(t) for t in row))
        _log(f"{gen.kind}: {sum(map(len, new))} new tokens in {seconds:.2f}s")
    return 0


def _from_tfaccel_checks(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by tfaccel's own code (an argument check), not deep in a library."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    package = os.path.dirname(os.path.abspath(__file__))
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(package + os.sep)


def _is_user_error(exc: BaseException) -> bool:
    """A problem the user can fix (exit 2, one line): tfaccel's errors, its own argument checks, and the
    operating system refusing a write (no space, read-only, permission denied). A step that failed with
    an unexpected exception is not one (exit 1, with the traceback log)."""
    import errno

    from tfaccel.errors import StepError, TfaccelError

    if _disk_full(exc):
        return True
    if isinstance(exc, StepError) and exc.unexpected:
        return False
    if isinstance(exc, (TfaccelError, UsageError)):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return True
    return isinstance(exc, (ValueError, TypeError, FileNotFoundError)) and _from_tfaccel_checks(exc)


def _disk_full(exc: BaseException) -> bool:
    """No space left (or the quota reached) while writing: from Python (errno) or from TensorFlow's own file
    writes inside a step (its errors carry the OS message, not an errno)."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(m in str(exc) for m in ("No space left on device", "Disk quota exceeded"))


def _one_line(exc: BaseException, args) -> str:
    out = getattr(args, "out", None)
    if _disk_full(exc):
        return (f"the disk is full{f' under {out!r}' if out else ''} (no space left on device); nothing half-written "
                f"was left{' and --out is as it was' if out else ''}. Free some space"
                + (" or choose another --out." if out else "."))
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename!s}" if exc.filename else (f" under {out!r}" if out else "")
        return f"cannot write{where}: {exc.strerror.lower()}"
    text = str(exc).strip()
    return text if text else type(exc).__name__


def _traceback_log(exc: BaseException, argv: list[str], out: str | None) -> str | None:
    """Write the full traceback to ``tfaccel-error-TIME-PID.log`` in --out's parent folder (or $TMPDIR);
    returns its path, or None if no folder took it."""
    import tempfile
    import traceback

    from tfaccel import __version__

    text = (f"tfaccel {__version__}, Python {sys.version.split()[0]}\ncommand: tfaccel {' '.join(argv)}\n"
            f"cwd: {os.getcwd()}\n\n" + "".join(traceback.format_exception(exc)))
    name = f"tfaccel-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    folders = ([os.path.dirname(os.path.abspath(out))] if out else []) + [tempfile.gettempdir()]
    for folder in folders:
        try:
            path = os.path.join(folder, name)
            with open(path, "x", encoding="utf-8") as fh:
                fh.write(text)
            return path
        except OSError:
            continue
    return None


def main(argv=None) -> int:
    """The `tfaccel` command. Exit codes: 0 success; 2 a problem with the input (one line naming it and
    the fix); 1 an unexpected error (one line naming it and the log file holding the traceback; --verbose
    prints it); 130 / 143 interrupted by Ctrl-C / SIGTERM (nothing half-written is left)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-workers"]:
        from tfaccel.distribute.launcher import main as train_workers

        return train_workers(argv[1:])
    args = build_parser().parse_args(argv)
    args.verbose = args.verbose or args.verbose_global
    _quiet_tf(args.verbose)
    from tfaccel.core.processes import sigterm_as_interrupt
    from tfaccel.errors import Terminated

    with sigterm_as_interrupt():  # SIGTERM like Ctrl-C: children stopped, staged output rolled back
        try:
            return args.func(args)
        except KeyboardInterrupt as exc:
            how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            print(f"tfaccel: {how}; nothing half-written was left"
                  + (f" (--out {args.out} is as it was)" if getattr(args, "out", None) else ""), file=sys.stderr)
            return 128 + exc.signum if isinstance(exc, Terminated) else EXIT_INTERRUPTED
        except Exception as exc:
            if args.verbose:
                import traceback

                traceback.print_exc()
            if _is_user_error(exc):
                print(f"tfaccel: error: {_one_line(exc, args)}", file=sys.stderr)
                return EXIT_USER_ERROR
            log = _traceback_log(exc, argv, getattr(args, "out", None))
            if log is None and not args.verbose:
                import traceback

                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            print(f"tfaccel: error: `tfaccel {args.command}` failed unexpectedly: {type(exc).__name__}"
                  + (f": {first}" if first else "")
                  + (f". The full traceback is in {log}" if log else "")
                  + "; rerun with --verbose to see it here, and please report it.", file=sys.stderr)
            return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
