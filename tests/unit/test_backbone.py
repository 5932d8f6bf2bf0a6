import copy

import pytest
import torch

from datamodules.tokenization import BatchTokenizer
from lightning_modules.backbone_adapter import Backbone, last_token_pool, mean_pool
from lightning_modules.backbones.tiny import byte_tokenizer, tiny_bert, tiny_qwen3


def test_decoder_pooling_picks_eos_with_right_padding_even_when_eos_is_pad():
    tokenizer = byte_tokenizer(eos_is_pad=True)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    batch = BatchTokenizer(tokenizer, "decoder", max_length=16).encode(["ab", "abcd"])
    eos = tokenizer.eos_token_id
    assert batch["input_ids"][0].tolist()[:3] == [*tokenizer("ab", add_special_tokens=False)["input_ids"], eos]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]  # the EOS is kept
    hidden = torch.arange(2 * 5 * 1, dtype=torch.float).view(2, 5, 1)
    assert last_token_pool(hidden, batch["attention_mask"]).flatten().tolist() == [2.0, 9.0]


def test_decoder_truncation_still_ends_in_eos():
    tokenizer = byte_tokenizer()
    batch = BatchTokenizer(tokenizer, "decoder", max_length=4).encode(["a long sentence"])
    assert batch["input_ids"].shape == (1, 4) and batch["input_ids"][0, -1] == tokenizer.eos_token_id


def test_mean_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_decoder_exit_with_final_norm_equals_model_cut_to_that_depth():
    torch.manual_seed(0)
    full = tiny_qwen3(vocab_size=260, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64).eval()
    tokenizer = byte_tokenizer()
    batch = BatchTokenizer(tokenizer, "decoder", max_length=16).encode(["hello", "a longer text"])
    bundle = Backbone(full, "decoder")(**batch)
    for depth in (1, 2, 3):
        cut = copy.deepcopy(full)
        cut.layers = cut.layers[:depth]
        cut.config.num_hidden_layers = depth
        cut.config.layer_types = cut.config.layer_types[:depth]
        expected = last_token_pool(cut(**batch).last_hidden_state, batch["attention_mask"])
        torch.testing.assert_close(bundle.layer(depth), expected, atol=1e-5, rtol=1e-5)
        # Without the norm the exit differs: the test would catch a missing norm.
        assert not torch.allclose(last_token_pool(bundle.hidden_states[depth], batch["attention_mask"]), expected)
    torch.testing.assert_close(bundle.layer(4), last_token_pool(full(**batch).last_hidden_state, batch["attention_mask"]))


def test_encoder_exits_are_mean_pooled_hidden_states_without_extra_norm():
    torch.manual_seed(0)
    model = tiny_bert(vocab_size=260, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64).eval()
    batch = BatchTokenizer(byte_tokenizer(), "encoder", max_length=16).encode(["hi", "a longer text"])
    bundle = Backbone(model, "encoder")(**batch)
    hidden = model(**batch, output_hidden_states=True).hidden_states
    for layer in (1, 2, 3):
        torch.testing.assert_close(bundle.layer(layer), mean_pool(hidden[layer], batch["attention_mask"]))
    assert bundle.layer(2) is bundle.layer(2)  # computed once per forward
    with pytest.raises(ValueError, match="1..3"):
        bundle.layer(0)


def test_batch_layout_queries_passages_negatives_with_prefixes():
    tokenizer = byte_tokenizer()
    tokenize = BatchTokenizer(tokenizer, "encoder", max_length=64, query_prefix="q: ", passage_prefix="p: ")
    batch = tokenize(["a", "b"], ["c", "d"], [["e1", "e2"], ["f1", "f2"]])
    assert batch["num_queries"] == 2 and batch["negatives_per_query"] == 2
    texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert texts == ["q: a", "q: b", "p: c", "p: d", "p: e1", "p: e2", "p: f1", "p: f2"]
    with pytest.raises(ValueError, match="same length"):
        tokenize(["a", "b"], ["c", "d"], [["e1"], ["f1", "f2"]])
