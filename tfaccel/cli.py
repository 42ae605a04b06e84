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
import os
import sys
import time

EXIT_USER_ERROR = 2


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # leave GPU memory for TensorRT


def cmd_env(args) -> int:
    from tfaccel.compat import capabilities

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
            raise ValueError(f"--set takes STEP.OPTION=VALUE, e.g. onnx.opset=17. Received: {v!r}") from None
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
        raise ValueError("Pass either --eval-data (an .npz) or --eval-texts (a .csv / .jsonl), not both.")
    if args.eval_data and args.eval_data.lower().endswith(TEXT_SUFFIXES):
        raise ValueError(f"--eval-data takes an .npz of model inputs plus 'labels'; for texts ({args.eval_data!r}) "
                         "use --eval-texts.")
    if args.eval_texts and args.eval_texts.lower().endswith(NPZ_SUFFIXES):
        raise ValueError(f"--eval-texts takes a .csv or .jsonl of texts; for an .npz ({args.eval_texts!r}) use "
                         "--eval-data.")
    bases = [parse_step_spec(n)[0] for n in names]
    if args.calibration_data and not set(bases) & set(_CALIBRATING_STEPS):
        raise ValueError(f"--calibration-data is read by the int8 calibration of {', '.join(_CALIBRATING_STEPS)}; "
                         "none of them is in --steps.")
    if args.train_data:
        pruning = [n for n, b in zip(names, bases, strict=True) if b == "prune-structured"]
        if not pruning:
            raise ValueError("--train-data is prune-structured's fine-tuning data; add prune-structured to --steps.")
        if any("data" in options.get(k, {}) for k in ("prune-structured", *pruning)):
            raise ValueError("Pass the fine-tuning data once: --train-data or --set prune-structured.data=..., not both.")
        options.setdefault("prune-structured", {})["data"] = args.train_data
    return args.eval_data or args.eval_texts


_AUTO_ONLY = {"max_accuracy_drop": "--max-accuracy-drop", "formats": "--formats", "time_budget": "--time-budget",
              "max_perplexity_ratio": "--max-perplexity-ratio", "max_kl": "--max-kl"}


def cmd_optimize_auto(args) -> int:
    """`tfaccel optimize MODEL --auto`: tfaccel.auto.optimize_auto, then the ranked table on stdout."""
    from tfaccel.auto.auto_report import ranked_table
    from tfaccel.auto.search import DEFAULT_TIME_BUDGET_S, optimize_auto
    from tfaccel.sources import load_source

    if args.steps is not None:
        raise ValueError("--auto and --steps are mutually exclusive: --auto chooses the steps itself from the "
                         "recipe table; pass one of them.")
    if args.set or args.on_breach != "fail" or args.no_measure:
        raise ValueError("--set, --on-breach and --no-measure apply to --steps runs; --auto validates and times "
                         "every candidate itself (see --max-accuracy-drop).")
    data = {k: getattr(args, k, None) for k in ("eval_data", "eval_texts", "calibration_data")}
    kwargs = {"eval_data": data["eval_data"] or data["eval_texts"]} if data["eval_data"] or data["eval_texts"] else {}
    if data["calibration_data"]:
        kwargs["calibration_data"] = data["calibration_data"]
    source = load_source(args.model, task=args.task, num_classes=args.num_classes, sample_inputs=args.inputs,
                         progress=_log, **kwargs)
    causal = source.task == "causal_lm" and source.kind == "keras"
    if causal:  # generation: BATCHxPROMPT+NEW shapes, a budget on held-out text
        from tfaccel.auto.generation_search import parse_generation_shape

        if args.max_accuracy_drop is not None:
            raise ValueError("--max-accuracy-drop judges classifiers; a causal LM's --auto budget is "
                             "--max-perplexity-ratio / --max-kl on held-out text.")
        shapes = [parse_generation_shape(v) for v in (args.shape or [])] or None
        generation = {k: v for k, v in (("max_perplexity_ratio", args.max_perplexity_ratio),
                                        ("max_kl", args.max_kl)) if v is not None}
        runs, warmup = min(args.runs, 5), min(args.warmup, 1)  # whole generations
    else:
        if args.max_perplexity_ratio is not None or args.max_kl is not None:
            raise ValueError("--max-perplexity-ratio / --max-kl judge a causal LM's generation on held-out text; "
                             f"{source.name} is a {source.task} model (see --max-accuracy-drop).")
        shapes, generation, runs, warmup = _parse_shapes(args.shape) or None, None, args.runs, args.warmup
    report = optimize_auto(
        source, args.out, shapes=shapes, formats=args.formats,
        max_accuracy_drop=1.0 if args.max_accuracy_drop is None else args.max_accuracy_drop,
        time_budget_s=DEFAULT_TIME_BUDGET_S if args.time_budget is None else args.time_budget,
        finetune_data=getattr(args, "train_data", None), runs=runs, warmup=warmup,
        overwrite=args.overwrite, log=_log, generation=generation)
    print("\n".join(report.table_lines() if causal else ranked_table(report)))
    print(f"\n{'saved_model' if causal else 'Winner'}: {report.winner} -> {report.final_saved_model_path}"
          + (f"; fastest of any format: {report.fastest_artifact} -> {report.out_dir}/{report.fastest_artifact_path}"
             if report.fastest_artifact != report.winner else "")
          + f". Report: {report.out_dir}/report.md")
    return 0


def cmd_optimize(args) -> int:
    if args.auto:
        return cmd_optimize_auto(args)
    if args.steps is None:
        raise ValueError("optimize needs --steps STEP,STEP,... (e.g. --steps export,onnx) or --auto.")
    given = [flag for key, flag in _AUTO_ONLY.items() if getattr(args, key) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --auto; "
                         "--steps runs use each step's own tolerance.")
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
        raise ValueError(f"--set names steps that are not in --steps: {sorted(unknown)}")
    eval_file = _data_options(args, names, options)
    steps = [step_from_spec(n, **{**options.get(parse_step_spec(n)[0], {}), **options.get(n, {})}) for n in names]
    source = load_source(args.model, task=args.task, num_classes=args.num_classes, sample_inputs=args.inputs,
                         progress=_log, eval_data=eval_file, calibration_data=args.calibration_data)
    shapes = _parse_shapes(args.shape) or [(1, source.default_seq)]
    pipe = Pipeline(steps, shapes=shapes, runs=args.runs, warmup=args.warmup, on_breach=args.on_breach,
                    measure=not args.no_measure, log=_log)
    report = pipe.run(source, args.out, overwrite=args.overwrite)
    print(report.to_markdown())
    return 0


def cmd_bench(args) -> int:
    from pathlib import Path

    from tfaccel.core.artifact import Artifact
    from tfaccel.core.measure import PeakRSS
    from tfaccel.core.timer import time_runner
    from tfaccel.sources import load_source

    target = args.model
    from tfaccel.openvino.ir import is_ir

    if isinstance(target, str) and is_ir(target):
        artifact = Artifact(kind="openvino", path=target)
        runner = artifact.runner()
        from tfaccel.sources import InputSpec, ModelSource

        specs = [InputSpec(name, "int32", (None, None)) for name in runner.input_types]
        source = ModelSource(name=target, kind="openvino", input_specs=specs, sample_inputs={}, vocab_size=100)
    elif isinstance(target, str) and target.endswith(".onnx"):
        if not Path(target).exists():
            raise FileNotFoundError(f"{target!r} does not exist.")
        artifact = Artifact(kind="onnx", path=target)
        runner = artifact.runner()
        from tfaccel.core.source import InputSpec, ModelSource

        specs = [InputSpec(i.name, "int32" if "int" in i.type else "float32", (None, None))
                 for i in runner.session.get_inputs()]
        source = ModelSource(name=target, kind="onnx", input_specs=specs, sample_inputs={}, vocab_size=100)
    else:
        source = load_source(target, task=args.task, num_classes=args.num_classes, progress=_log)
        artifact = Artifact.of_source(source)
        runner = None
    shapes = _parse_shapes(args.shape) or [(1, source.default_seq)]
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

    p = argparse.ArgumentParser(prog="tfaccel", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"tfaccel {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("env", help="what this machine and TensorFlow build can do")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=cmd_env)

    s = sub.add_parser("steps", help="list pipeline steps and built-in example models")
    s.set_defaults(func=cmd_steps)

    def model_args(sp):
        sp.add_argument("model", help="example name (minilm-bbc, bert-base, gpt2-small, bert-tiny, gpt2-tiny), "
                                       ".keras file, keras-hub preset / Hugging Face folder, or SavedModel folder")
        sp.add_argument("--task", choices=["backbone", "classification", "causal_lm"],
                        help="how to load a preset folder (default: backbone)")
        sp.add_argument("--num-classes", type=int, help="classes, for --task classification")
        sp.add_argument("--shape", action="append", metavar="BATCHxSEQ",
                        help="measure at this batch x sequence length; repeatable (default 1x128). --auto on a causal "
                             "LM: BATCHxPROMPT+NEW whole generations, e.g. 1x32+64 (the default) and 8x32+64")
        sp.add_argument("--runs", type=int, default=20, help="timed runs per shape (default 20)")
        sp.add_argument("--warmup", type=int, default=3, help="warm-up runs per shape (default 3)")

    o = sub.add_parser("optimize", help="apply steps, validate and measure each, write stages and a report")
    model_args(o)
    o.add_argument("--steps",
                   help="comma-separated steps, e.g. export,onnx,ort-int8; STEP@FROM starts a step from an earlier "
                        "step's artifact (litert-dynamic@export) or the model (@reference)")
    o.add_argument("--out", required=True, help="output folder (created only if the run succeeds)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing --out (only on success)")
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
                   help="--auto: SavedModel candidates only (default), or also OpenVINO/ONNX/LiteRT/TensorRT side artifacts")
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

    c = sub.add_parser("serve-check", help="check a SavedModel loads and runs without tfaccel (saved_model_cli), or an "
                                           "OpenVINO IR with OpenVINO alone")
    c.add_argument("saved_model", help="SavedModel folder, or OpenVINO IR folder / .xml")
    c.set_defaults(func=cmd_serve_check)

    b = sub.add_parser("bench", help="measure latency of a model or artifact (.onnx and OpenVINO IR too)")
    model_args(b)
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=cmd_bench)

    g = sub.add_parser("generate", help="greedy generation with a generation artifact (generate SavedModel, ONNX "
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
    sub.add_parser("train-workers", add_help=False,
                   help="run N local MultiWorkerMirroredStrategy workers (TF_CONFIG on loopback ports), "
                        "restarting any that die: tfaccel train-workers 2 -- python train.py")
    return p


def cmd_generate(args) -> int:
    from tfaccel.generation import load_generator
    from tfaccel.generation.prompts import parse_prompt_ids

    prompts = parse_prompt_ids(args.prompt_ids)
    options = {} if args.threads is None else {"intra_op_threads": args.threads}
    if args.spin:
        options["spinning"] = True
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


def main(argv=None) -> int:
    _quiet_tf()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-workers"]:
        from tfaccel.distribute.launcher import main as train_workers

        return train_workers(argv[1:])
    args = build_parser().parse_args(argv)
    from tfaccel.errors import TfaccelError

    try:
        return args.func(args)
    except (TfaccelError, ValueError, FileNotFoundError) as exc:
        print(f"tfaccel: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("tfaccel: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
