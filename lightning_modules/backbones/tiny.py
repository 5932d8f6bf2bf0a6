"""Tiny random-init backbones and a byte-level tokenizer: offline, built in milliseconds, for tests."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def byte_tokenizer(eos_is_pad: bool = False) -> PreTrainedTokenizerFast:
    """Every UTF-8 byte is one token (260 ids in all), so any language tokenizes with no trained vocabulary.

    Args:
        eos_is_pad: use ``</s>`` as the padding token too, as some decoder tokenizers do.
    """
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + byte_chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>" if eos_is_pad else "<pad>", model_max_length=512)


MAX_POSITIONS = 512  # position embeddings of both tiny backbones


def tiny_bert(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
              dropout: float = 0.0) -> BertModel:
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=intermediate_size,
                        max_position_embeddings=MAX_POSITIONS, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    return BertModel(config, add_pooling_layer=False)


def tiny_qwen3(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
               dropout: float = 0.0) -> Qwen3Model:
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
                         head_dim=hidden_size // num_heads, intermediate_size=intermediate_size,
                         max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, attention_dropout=dropout)
    return Qwen3Model(config)
