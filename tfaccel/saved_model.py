"""THE SavedModel writer of tfaccel: every SavedModel a step writes (export, xla, int8, int4, generate, an
XLA re-wrap of a SavedModel) goes through :func:`write_endpoints`.

What it guarantees, each measured (shared FACTS.md, tests/test_saved_model.py):

* **Servable.** It is ``keras.export.ExportArchive`` underneath, the pattern ``saved_model_cli run`` (and so
  TF Serving, which loads through a session the same way) can load.
* **XLA kept.** An endpoint given as a ``tf.function(jit_compile=True)`` keeps its ``_XlaMustCompile``
  attribute in the SavedModel and is still compiled after a reload in a fresh process
  (``add_endpoint``'s own ``jit_compile`` argument is lost on reload).
* **Each weight stored once.** Keras' ``ExportArchive.track(model)`` registers the ``keras.Variable``
  wrappers in the archive's ``variables`` collections, while the traced endpoint captures the
  ``tf.Variable`` inside each wrapper; the two are different Python objects, so TensorFlow's identity-based
  de-duplication saves every weight twice (keras-team/keras#23553: 2x on disk, 2x variable memory in every
  process that loads it). Here the collections hold the underlying ``tf.Variable`` objects, the very ones
  the endpoints capture, so each weight is one checkpoint entry. :func:`stored_values` counts them.

:func:`load_footprint` measures what a SavedModel costs a server: its size on disk and the resident memory a
fresh process gains by loading it and running it once.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tfaccel.core.artifact import (
    graph_function,
    normalize_outputs,
    output_names_of,
    serving_signature,
)
from tfaccel.core.files import dir_size, temporary_folder
from tfaccel.core.processes import run_child
from tfaccel.core.source import input_specs_of_keras
from tfaccel.errors import TfaccelError
from tfaccel.servable import fresh_process_env

# The checkpoint's own bookkeeping entry (a serialized proto), not a variable.
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def tf_variable_of(variable):
    """The ``tf.Variable`` a Keras variable wraps (the object a traced function captures); other
    variables are returned as they are.

    Example:
        >>> tf_variable_of(model.weights[0])  # doctest: +SKIP
        <tf.Variable 'token_embedding/embeddings:0' shape=(1000, 32) dtype=float32, ...>
    """
    import tensorflow as tf

    inner = getattr(variable, "_value", None)  # keras.Variable on the TensorFlow backend
    return inner if isinstance(inner, tf.Variable) else variable


def _unique(variables: Iterable) -> list:
    seen, out = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def write_endpoints(folder: str | os.PathLike, endpoints: Mapping[str, Any], *, track: Iterable = (),
                    trainable_variables: Iterable = (), non_trainable_variables: Iterable = ()) -> None:
    """Write a SavedModel with the given signatures, each variable stored once.

    Args:
        folder: empty or absent folder to write.
        endpoints: signature name -> ``tf.function`` with an ``input_signature`` (set ``jit_compile=True`` on
            it for an XLA signature). The first is also ``serving_default`` if no endpoint has that name.
        track: Keras models/layers or TensorFlow trackables whose lookup tables and other resources the
            endpoints use (``ExportArchive.track``); their variables are NOT taken from here.
        trainable_variables, non_trainable_variables: the variables a reloaded object lists as
            ``.trainable_variables`` / ``.non_trainable_variables`` (``.variables`` is both). Keras
            variables are replaced by the ``tf.Variable`` they wrap. Variables the endpoints capture are
            saved in any case, once.

    Example:
        >>> fn = tf.function(serve, input_signature=[spec], jit_compile=True)  # doctest: +SKIP
        >>> write_endpoints("out", {"serving_default": fn}, track=[model],  # doctest: +SKIP
        ...                 trainable_variables=model.trainable_weights,
        ...                 non_trainable_variables=model.non_trainable_weights)
    """
    import keras

    if not endpoints:
        raise ValueError("write_endpoints needs at least one endpoint (signature name -> tf.function).")
    trainable = _unique(tf_variable_of(v) for v in trainable_variables)
    non_trainable = _unique(tf_variable_of(v) for v in non_trainable_variables)
    archive = keras.export.ExportArchive()
    for resource in track:
        archive.track(resource)
    # track() filled the collections with the keras.Variable wrappers (the second copy of keras#23553);
    # replace them with the tf.Variables the endpoints capture, which TensorFlow then saves once.
    archive.add_variable_collection("variables", trainable + non_trainable)
    archive.add_variable_collection("trainable_variables", trainable)
    archive.add_variable_collection("non_trainable_variables", non_trainable)
    for name, fn in endpoints.items():
        archive.add_endpoint(name, fn)
    archive.write_out(str(folder), verbose=False)


def keras_serving_fn(model, *, jit_compile: bool = False):
    """``serving_default`` of a Keras model: named inputs with dynamic batch (and sequence) dimensions in,
    named outputs out, as a ``tf.function`` (:func:`tfaccel.core.artifact.graph_function`: no AutoGraph)."""

    specs, dict_inputs = input_specs_of_keras(model)
    names = output_names_of(model)
    first = specs[0].name

    def serve(inputs):
        x = inputs if dict_inputs else inputs[first]
        return normalize_outputs(model(x, training=False), names)

    return graph_function(serve, input_signature=[serving_signature(specs)], jit_compile=jit_compile or None)


def write_keras_endpoints(model, folder: str | os.PathLike, endpoints: Mapping[str, Any]) -> None:
    """:func:`write_endpoints` for a Keras model: tracks it and lists its weights, each stored once.

    Example:
        >>> write_keras_endpoints(model, "out", {"serving_default": keras_serving_fn(model)})  # doctest: +SKIP
    """
    write_endpoints(folder, endpoints, track=[model], trainable_variables=model.trainable_weights,
                    non_trainable_variables=model.non_trainable_weights)


def write_saved_model(model, folder: str | os.PathLike, *, jit_compile: bool = False,
                      signature_name: str = "serving_default") -> None:
    """Write ``model`` as a SavedModel into ``folder`` (which must be empty or absent), each weight once.

    Args:
        model: a built Keras model.
        folder: empty or absent folder.
        jit_compile: XLA-compile the serving function (kept after a reload).
        signature_name: the signature's name.

    Example:
        >>> write_saved_model(model, "exported")  # doctest: +SKIP
        >>> stored_values("exported") == model.count_params()  # doctest: +SKIP
        True
    """
    write_keras_endpoints(model, folder, {signature_name: keras_serving_fn(model, jit_compile=jit_compile)})


# --------------------------------------------------------------------------------------------------
# What a SavedModel holds and costs


def stored_variables(saved_model_dir: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every variable in a SavedModel's checkpoint (``variables/variables``): key -> (shape, dtype).

    Example:
        >>> sorted(stored_variables("exported"))[:1]  # doctest: +SKIP
        ['variables/0/.ATTRIBUTES/VARIABLE_VALUE']
    """
    import tensorflow as tf

    prefix = Path(saved_model_dir) / "variables" / "variables"
    if not Path(f"{prefix}.index").exists():
        raise TfaccelError(f"{str(saved_model_dir)!r} has no variables checkpoint (variables/variables.index). "
                           "Pass a SavedModel folder.")
    reader = tf.train.load_checkpoint(str(prefix))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    return {k: (tuple(int(d) for d in shapes[k]), dtypes[k].name) for k in shapes if k != _OBJECT_GRAPH_KEY}


def stored_values(saved_model_dir: str | os.PathLike) -> int:
    """How many values a SavedModel's variables checkpoint stores (the sum of its variables' sizes):
    ``model.count_params()`` when each weight is stored once, twice that for Keras' ``model.export``.

    Example:
        >>> stored_values("exported")  # doctest: +SKIP
        26819
    """
    return int(sum(int(np.prod(shape)) for shape, _ in stored_variables(saved_model_dir).values()))


# Runs in a fresh process, without tfaccel: RSS after importing TensorFlow, then after loading the
# SavedModel and running serving_default once on the given inputs.
_FOOTPRINT_CHILD = r"""
import json, os, sys
import numpy as np
import psutil
import tensorflow as tf
path, sig_name, in_npz = sys.argv[1:4]
proc = psutil.Process(os.getpid())
tf.constant(0.0) + 1.0  # the runtime is up before the first reading
before = proc.memory_info().rss
loaded = tf.saved_model.load(path)
fn = loaded.signatures[sig_name]
_, specs = fn.structured_input_signature
given = dict(np.load(in_npz)) if os.path.exists(in_npz) else {}
inputs = {}
for name, spec in specs.items():
    if name in given:
        inputs[name] = tf.constant(given[name], dtype=spec.dtype)
    else:
        shape = [1 if d is None else d for d in spec.shape.as_list()]
        inputs[name] = tf.ones(shape, spec.dtype) if spec.dtype != tf.string else tf.fill(shape, "a")
loaded_rss = proc.memory_info().rss
fn(**inputs)
after = proc.memory_info().rss
print("FOOTPRINT " + json.dumps({"rss_before": before, "rss_loaded": loaded_rss, "rss_after": after}))
"""


def load_footprint(saved_model_dir: str | os.PathLike, inputs: Mapping[str, np.ndarray] | None = None,
                   signature: str = "serving_default", timeout: float = 600) -> dict[str, int]:
    """Size on disk and resident memory after loading, in a fresh process without tfaccel.

    Args:
        saved_model_dir: the SavedModel folder.
        inputs: named arrays to run the signature on once (missing inputs: ones of size 1 per dynamic dim).
        signature: the signature to run.

    Returns:
        ``{"size_bytes", "load_rss_bytes", "load_only_rss_bytes"}``: the folder's size, and how much a
        process's RSS grew from TensorFlow's start through ``tf.saved_model.load`` and one call (what a
        server pays per model; XLA signatures include the compiler's memory), and through the load only.

    Example:
        >>> load_footprint("exported", bert_tiny.sample_inputs)["load_rss_bytes"]  # doctest: +SKIP
        15728640
    """
    path = Path(saved_model_dir).absolute()
    if not (path / "saved_model.pb").exists():
        raise TfaccelError(f"{str(path)!r} is not a SavedModel folder (no saved_model.pb).")
    env = fresh_process_env()
    with temporary_folder("footprint") as tmp:
        in_npz = Path(tmp, "inputs.npz")
        if inputs:
            np.savez(in_npz, **{k: np.asarray(v) for k, v in inputs.items()})
        proc = run_child([sys.executable, "-c", _FOOTPRINT_CHILD, str(path), signature, str(in_npz)],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FOOTPRINT ")), None)
    if proc.returncode != 0 or line is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise TfaccelError(f"Loading {str(path)!r} in a fresh process to measure its memory failed:\n{tail}")
    rss = json.loads(line.split(" ", 1)[1])
    return {"size_bytes": dir_size(path), "load_rss_bytes": max(0, rss["rss_after"] - rss["rss_before"]),
            "load_only_rss_bytes": max(0, rss["rss_loaded"] - rss["rss_before"])}


def keras_export_footprint(model, inputs: Mapping[str, np.ndarray] | None = None) -> dict[str, int]:
    """:func:`load_footprint` of a plain Keras ``model.export(path, format="tf_saved_model")`` (written to a
    temporary folder and removed): the baseline the report compares every SavedModel with.

    Example:
        >>> keras_export_footprint(bert_tiny.model, bert_tiny.sample_inputs)  # doctest: +SKIP
        {'size_bytes': 785000, 'load_rss_bytes': 18000000, 'stored_values': 53654}
    """
    with temporary_folder("model-export") as tmp:
        path = Path(tmp, "model_export")
        model.export(str(path), format="tf_saved_model", verbose=False)
        out = load_footprint(path, inputs)
        out["stored_values"] = stored_values(path)
    return out


# model.export footprints measured in this process, by _baseline_key: size and memory depend on the
# variables' shapes and dtypes and the inputs' shapes, not on the weights' values.
_BASELINES: dict[tuple, dict[str, int]] = {}


def _baseline_key(model, inputs) -> tuple:
    return (id(model), tuple((tuple(v.shape), str(v.dtype)) for v in model.variables),
            tuple(sorted((k, np.shape(v)) for k, v in (inputs or {}).items())))


def add_load_footprints(report, source, work_dir: str | os.PathLike, log=None, workers: int = 2) -> None:
    """Fill in what every SavedModel stage of a pipeline run costs a server, against ``model.export``.

    For each SavedModel stage (and a SavedModel reference): size, stored variable values, and the resident
    memory a fresh process gains loading it and running it once (one child process per SavedModel, ``workers``
    at a time: each measures only its own RSS). For a Keras source, ``report.model_export`` gets the same for
    a plain ``model.export`` of the reference, the baseline of the ratios in report.md (measured once per
    model in a process). A SavedModel that fails to load there gets a note, not an error (validation
    already ran it in this process).

    Args:
        report: the run's :class:`tfaccel.core.report.Report` (stage paths relative to ``work_dir``).
        source: the run's :class:`tfaccel.sources.ModelSource`.
        work_dir: the run's folder.
        log: progress callable.
        workers: child processes at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    log = log or (lambda _m: None)
    inputs = source.sample_inputs
    jobs: dict[Any, Path] = {}  # stage position in report.stages (or "model_export") -> SavedModel folder
    for pos, st in enumerate(report.stages):
        if st.kind != "saved_model" or st.status == "skipped":
            continue
        path = Path(source.path) if st.index == 0 else (Path(work_dir) / st.path if st.path else None)
        if path is None or not path.exists():
            continue
        if not (path / "saved_model.pb").exists():
            path = next((p.parent for p in sorted(path.rglob("saved_model.pb"))), path)
        jobs[pos] = path
    baseline_key = _baseline_key(source.model, inputs) if source.kind == "keras" and source.model is not None else None
    if baseline_key in _BASELINES:  # the same model (shapes and dtypes) measured earlier in this process
        report.model_export = dict(_BASELINES[baseline_key])
        baseline_key = None
    with temporary_folder("model-export") as tmp:
        if baseline_key is not None:
            log("load footprint: model.export of the reference (the baseline)")
            try:
                source.model.export(str(Path(tmp, "model_export")), format="tf_saved_model", verbose=False)
                jobs["model_export"] = Path(tmp, "model_export")
            except Exception as exc:  # a model Keras cannot export: no baseline, the stages are still measured
                report.reference.notes.append(f"model.export baseline not measured: {type(exc).__name__}: {exc}")
        if not jobs:
            return

        def measure(path):
            try:
                return {**load_footprint(path, inputs), "stored_values": stored_values(path)}
            except TfaccelError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = dict(zip(jobs, pool.map(measure, jobs.values()), strict=True))
    for key, fp in results.items():
        if key == "model_export":
            if isinstance(fp, TfaccelError):
                report.reference.notes.append(f"model.export baseline not measured: {str(fp).splitlines()[0]}")
            else:
                report.model_export = _BASELINES[baseline_key] = fp
            continue
        st = report.stages[key]
        if isinstance(fp, TfaccelError):
            st.notes.append(f"memory after loading not measured: {str(fp).splitlines()[0]}")
            continue
        st.load_rss_bytes, st.stored_values = fp["load_rss_bytes"], fp["stored_values"]
        log(f"load footprint: {st.step}: {fp['size_bytes'] / 1e6:.1f} MB on disk, "
            f"{fp['load_rss_bytes'] / 1e6:.0f} MB resident after load + one call")
