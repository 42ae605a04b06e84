"""Tiny random-weight models of every keras-hub text family, built without any download.

``tfaccel.load_source("tiny:<family>")`` returns one as a :class:`tfaccel.sources.ModelSource`:
BERT-like encoders as text classifiers (3 classes; ELECTRA, which has no keras-hub classifier, as a
backbone), decoders as CausalLMs with ``preprocessor=None`` (driven by token ids). Every config is
small (hidden 32, 2 layers, vocabulary 256) so that a whole family x step matrix runs in CI; the
decoders keep each family's own features: grouped KV heads (Llama, Mistral, Qwen, Gemma, Phi-3,
SmolLM3), rotary or ALiBi positions, sliding windows (Mistral, Gemma 2/3), logit soft-capping (Gemma).
Weights are random (seeded), so outputs mean nothing; they only check that the steps keep them.
"""

from __future__ import annotations

VOCAB = 256
HIDDEN = 32
LAYERS = 2
SAMPLE_BATCH = 4
SAMPLE_SEQ = 16

ENCODERS = ("bert", "distilbert", "roberta", "deberta_v3", "xlm_roberta", "albert", "electra")
DECODERS = ("gpt2", "gpt_neox", "opt", "llama", "llama3", "mistral", "gemma", "gemma3", "qwen", "qwen3",
            "phi3", "falcon", "bloom", "smollm3")
FAMILIES = ENCODERS + DECODERS


def _encoder(family, hub):
    common = dict(vocabulary_size=VOCAB, num_layers=LAYERS, num_heads=2, hidden_dim=HIDDEN, intermediate_dim=64,
                  max_sequence_length=64)
    if family == "bert":
        return hub.models.BertTextClassifier(hub.models.BertBackbone(**common), num_classes=3, preprocessor=None)
    if family == "distilbert":
        return hub.models.DistilBertTextClassifier(hub.models.DistilBertBackbone(**common), num_classes=3,
                                                   preprocessor=None)
    if family == "roberta":
        return hub.models.RobertaTextClassifier(hub.models.RobertaBackbone(**common), num_classes=3,
                                                preprocessor=None)
    if family == "deberta_v3":
        return hub.models.DebertaV3TextClassifier(hub.models.DebertaV3Backbone(**common, bucket_size=16),
                                                  num_classes=3, preprocessor=None)
    if family == "xlm_roberta":
        return hub.models.XLMRobertaTextClassifier(hub.models.XLMRobertaBackbone(**common), num_classes=3,
                                                   preprocessor=None)
    if family == "albert":
        return hub.models.AlbertTextClassifier(hub.models.AlbertBackbone(**common, embedding_dim=16), num_classes=3,
                                               preprocessor=None)
    if family == "electra":
        kw = {k: v for k, v in common.items() if k != "vocabulary_size"}
        return hub.models.ElectraBackbone(vocab_size=VOCAB, embedding_dim=16, **kw)
    raise KeyError(family)


def _decoder(family, hub):
    m = hub.models
    gqa = dict(vocabulary_size=VOCAB, num_layers=LAYERS, num_query_heads=4, num_key_value_heads=2, hidden_dim=HIDDEN,
               intermediate_dim=64)
    if family == "gpt2":
        b = m.GPT2Backbone(vocabulary_size=VOCAB, num_layers=LAYERS, num_heads=2, hidden_dim=HIDDEN,
                           intermediate_dim=64, max_sequence_length=64)
        return m.GPT2CausalLM(b, preprocessor=None)
    if family == "gpt_neox":
        b = m.GPTNeoXBackbone(vocabulary_size=VOCAB, num_layers=LAYERS, num_heads=2, hidden_dim=HIDDEN,
                              intermediate_dim=64, max_sequence_length=64)
        return m.GPTNeoXCausalLM(b, preprocessor=None)
    if family == "opt":
        b = m.OPTBackbone(vocabulary_size=VOCAB, num_layers=LAYERS, num_heads=2, hidden_dim=HIDDEN,
                          intermediate_dim=64, max_sequence_length=64)
        return m.OPTCausalLM(b, preprocessor=None)
    if family == "llama":
        return m.LlamaCausalLM(m.LlamaBackbone(**gqa), preprocessor=None)
    if family == "llama3":
        return m.Llama3CausalLM(m.Llama3Backbone(**gqa), preprocessor=None)
    if family == "mistral":
        return m.MistralCausalLM(m.MistralBackbone(**gqa, sliding_window=8), preprocessor=None)
    if family == "gemma":  # Gemma 2 style: soft-capping, sliding window, post norms
        b = m.GemmaBackbone(**gqa, head_dim=8, attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
                            use_post_ffw_norm=True, use_post_attention_norm=True, use_sliding_window_attention=True,
                            sliding_window_size=8)
        return m.GemmaCausalLM(b, preprocessor=None)
    if family == "gemma3":
        b = m.Gemma3Backbone(**gqa, head_dim=8, image_size=None, use_post_ffw_norm=True, use_post_attention_norm=True,
                             use_sliding_window_attention=True, sliding_window_size=8, vision_encoder=None)
        return m.Gemma3CausalLM(backbone=b, preprocessor=None)
    if family == "qwen":
        return m.QwenCausalLM(m.QwenBackbone(**gqa), preprocessor=None)
    if family == "qwen3":
        return m.Qwen3CausalLM(m.Qwen3Backbone(**gqa, head_dim=8), preprocessor=None)
    if family == "phi3":
        b = m.Phi3Backbone(**gqa, max_sequence_length=64, pretraining_sequence_length=64)
        return m.Phi3CausalLM(b, preprocessor=None)
    if family == "falcon":
        b = m.FalconBackbone(vocabulary_size=VOCAB, num_layers=LAYERS, num_attention_heads=2, hidden_dim=HIDDEN,
                             intermediate_dim=64)
        return m.FalconCausalLM(b, preprocessor=None)
    if family == "bloom":
        b = m.BloomBackbone(vocabulary_size=VOCAB, num_layers=LAYERS, num_heads=2, hidden_dim=HIDDEN,
                            intermediate_dim=64)
        return m.BloomCausalLM(b, preprocessor=None)
    if family == "smollm3":
        b = m.SmolLM3Backbone(vocabulary_size=VOCAB, hidden_dim=HIDDEN, intermediate_dim=64, num_layers=LAYERS,
                              num_attention_heads=4, num_key_value_heads=2, attention_bias=False,
                              attention_dropout=0.0, rope_layer_enabled_list=[True, False],
                              layer_types=["attention"] * LAYERS, mlp_bias=False, layer_norm_epsilon=1e-5,
                              max_position_embeddings=64, rope_theta=10000.0, partial_rotary_factor=1.0)
        return m.SmolLM3CausalLM(b, preprocessor=None)
    raise KeyError(family)


def build_model(family: str, seed: int = 0):
    """The tiny Keras model of ``family`` (seeded random weights)."""
    import keras
    import keras_hub

    if family not in FAMILIES:
        from tfaccel.errors import SourceError

        raise SourceError(f"Unknown tiny family {family!r}. Known: {', '.join(FAMILIES)}.")
    keras.utils.set_random_seed(seed)
    return _decoder(family, keras_hub) if family in DECODERS else _encoder(family, keras_hub)


def tiny_source(family: str, progress=None):
    """``tiny:<family>`` as a ModelSource with a small sample batch (4 rows, up to 16 tokens, varied lengths)."""
    from tfaccel.core.source import source_from_keras_model, token_sample_inputs

    model = build_model(family)
    if family in DECODERS:
        task, what = "causal_lm", "causal LM"
    elif family == "electra":
        task, what = "backbone", "encoder backbone"
    else:
        task, what = "classification", "text classifier (3 classes)"
    src = source_from_keras_model(model, name=f"tiny:{family}", task=task,
                                  description=f"tiny {family} {what}, random weights (tests)")
    src.sample_inputs = token_sample_inputs(src.input_specs, VOCAB, batch=SAMPLE_BATCH, seq=SAMPLE_SEQ)
    src.default_seq = SAMPLE_SEQ
    return src


def _builder(family):
    def build(progress=None):
        return tiny_source(family, progress=progress)

    return build


#: "tiny:<family>" -> (builder, description), merged into tfaccel.examples.EXAMPLES.
EXAMPLES = {f"tiny:{f}": (_builder(f), f"tiny {f} ({'causal LM' if f in DECODERS else 'encoder'}), random weights")
            for f in FAMILIES}
