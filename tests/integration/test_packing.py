"""Packed batches (data.packing): layout, and equality with the padded forward (embeddings, gradients, losses)."""

import copy

import mlflow
import pytest
import torch

from contracts.batch_layout import pack
from datamodules.tokenization import BatchTokenizer
from experiments.run import train
from lightning_modules.backbone_adapter import Backbone
from lightning_modules.backbones.tiny import byte_tokenizer, tiny_bert, tiny_qwen3
from lightning_modules.packing import use_varlen_attention

# Varied lengths (1 to 40 bytes), a non-ASCII text and two equal texts.
TEXTS = ["a", "hello world", "Guten Morgen, wie geht es dir heute?", "ok", "привет мир", "a much longer sentence "
         "with many words in it", "ok", "xyz"]


def test_pack_fills_rows_first_fit_by_decreasing_length():
    batch = pack([[5, 6, 7], [8], [9, 9], [4, 4, 4]], pad_id=0)
    # Widths 3: [5 6 7] and [4 4 4] fill rows 0 and 1; [9 9] opens row 2, where [8] fits after it.
    assert batch["input_ids"].tolist() == [[5, 6, 7], [4, 4, 4], [9, 9, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
    layout = batch["packing"]
    assert layout["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 0]]
    assert layout["sequence_ids"].tolist() == [[0, 0, 0], [3, 3, 3], [2, 2, 1]]
    assert layout["last_index"].tolist() == [2, 8, 7, 5]  # flat index of each text's last token, in text order
    assert layout["cu_seqlens"].tolist() == [0, 3, 6, 8, 9] and layout["max_length"] == 3


def test_pack_pads_the_tail_of_a_row_as_its_own_segment():
    layout = pack([[1, 2, 3, 4], [5, 6]], pad_id=9)
    assert layout["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 9, 9]]
    assert layout["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert layout["packing"]["sequence_ids"].tolist() == [[0, 0, 0, 0], [1, 1, -1, -1]]
    assert layout["packing"]["cu_seqlens"].tolist() == [0, 4, 6, 8]


def test_training_batch_is_packed_with_the_same_texts_and_fewer_pad_tokens():
    tokenizer = byte_tokenizer()
    padded = BatchTokenizer(tokenizer, "encoder", max_length=48)(TEXTS[:4], TEXTS[4:])
    packed = BatchTokenizer(tokenizer, "encoder", max_length=48, packing=True)(TEXTS[:4], TEXTS[4:])
    assert packed["texts"] == padded["texts"] and packed["num_queries"] == 4
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum()  # the same tokens
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    ids, sequence_ids = packed["input_ids"].flatten(), packed["packing"]["sequence_ids"].flatten()
    for text, row in enumerate(padded["input_ids"]):
        assert ids[sequence_ids == text].tolist() == row[padded["attention_mask"][text].bool()].tolist()


def _tiny(family: str, eos_is_pad: bool = False):
    torch.manual_seed(0)
    build = tiny_qwen3 if family == "decoder" else tiny_bert
    model = build(vocab_size=260, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64)
    return model, BatchTokenizer(byte_tokenizer(eos_is_pad=eos_is_pad), family, max_length=48)


def _exits_and_gradients(backbone: Backbone, batch: dict) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Every exit's pooled embeddings and the gradients of a loss that mixes all of them."""
    backbone.zero_grad(set_to_none=True)
    bundle = backbone(**batch)
    exits = [bundle.layer(layer) for layer in range(1, bundle.num_layers + 1)]
    weights = torch.linspace(-1, 1, exits[0].numel()).view_as(exits[0])
    sum(((exit * weights).sum() * (i + 1)) for i, exit in enumerate(exits)).backward()
    return [exit.detach() for exit in exits], {name: p.grad.clone() for name, p in backbone.named_parameters()}


@pytest.mark.parametrize("family,eos_is_pad,varlen", [("encoder", False, False), ("decoder", False, False),
                                                      ("decoder", True, False), ("encoder", False, True),
                                                      ("decoder", False, True)])
def test_packed_forward_equals_padded_embeddings_and_gradients(family, eos_is_pad, varlen):
    model, tokenize = _tiny(family, eos_is_pad)
    padded_backbone = Backbone(model, family)
    packed_model = copy.deepcopy(model)
    if varlen:  # on CPU the reference loop of per-segment attention, on CUDA torch's varlen kernel
        use_varlen_attention(packed_model)
    padded = tokenize.encode(TEXTS)
    ids = tokenize.token_ids(TEXTS)
    packed = pack(ids, tokenize.pad_id)
    assert packed["input_ids"].shape[0] < len(TEXTS)
    padded_exits, padded_grads = _exits_and_gradients(padded_backbone, padded)
    packed_exits, packed_grads = _exits_and_gradients(Backbone(packed_model, family), packed)
    for layer, (expected, actual) in enumerate(zip(padded_exits, packed_exits), start=1):
        assert (actual - expected).abs().max() <= 1e-5, f"exit {layer}"
    # fp32 summation orders differ: tolerance relative to the largest gradient (a key bias's is 0 up to rounding).
    scale = max(grad.abs().max().item() for grad in padded_grads.values())
    for name, expected in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], expected, atol=1e-6 * scale, rtol=1e-5, msg=name)
    # A layout that let texts see each other would differ: the check can fail.
    leaky = dict(packed, packing=dict(packed["packing"], sequence_ids=torch.zeros_like(packed["input_ids"])))
    if not varlen:
        assert (Backbone(packed_model, family)(**leaky).layer(3) - padded_exits[2]).abs().max() > 1e-3


def _losses(config, run_id: str, name: str) -> list[float]:
    history = mlflow.MlflowClient(config.tracking.uri).get_metric_history(run_id, name)
    return [metric.value for metric in sorted(history, key=lambda metric: metric.step)]


@pytest.mark.parametrize("source", ["tiny_bert", "tiny_qwen3"])
def test_packed_training_logs_the_padded_runs_losses(tiny_config, tmp_path, source):
    # Byte tokens: 256 lets several of these sentences share a row.
    overrides = [f"model.source={source}", "model.max_length=256", "trainer.max_steps=4", "data.locales=[de]"]
    runs = {packing: train(tiny_config("tiny", [*overrides, f"data.packing={packing}",
                                                f"output_dir={tmp_path}/{packing}"])) for packing in (False, True)}
    config = tiny_config("tiny")
    padded, packed = (_losses(config, runs[packing].run_id, "train/loss") for packing in (False, True))
    assert len(padded) == 4
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(padded), atol=1e-5, rtol=1e-5)
    padding = {packing: _losses(config, runs[packing].run_id, "run/data/device/padding_fraction") for packing in (False, True)}
    assert max(padding[True]) < min(padding[False])


def test_backbone_teacher_reads_the_asked_texts_of_a_packed_batch():
    from lightning_modules.plugins.distillation import BackboneTeacher

    model, tokenize = _tiny("encoder")
    teacher = BackboneTeacher(Backbone(model, "encoder"))
    padded = BatchTokenizer(tokenize.tokenizer, "encoder", max_length=48)(TEXTS[:4], TEXTS[4:])
    packed = BatchTokenizer(tokenize.tokenizer, "encoder", max_length=48, packing=True)(TEXTS[:4], TEXTS[4:])
    rows = [6, 1, 3]
    assert (teacher.encode(packed, rows) - teacher.encode(padded, rows)).abs().max() <= 1e-5


def test_varlen_model_with_attention_dropout_trains_through_the_block_mask():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0),
                      add_pooling_layer=False)
    use_varlen_attention(model)  # the kernel has no dropout: training must not go through it
    tokenize = BatchTokenizer(byte_tokenizer(), "encoder", max_length=48)
    packed = pack(tokenize.token_ids(TEXTS), tokenize.pad_id)
    backbone = Backbone(model, "encoder").train()
    assert torch.isfinite(backbone(**packed).layer(2)).all()
    backbone.eval()  # no dropout: the varlen path, equal to the padded forward
    expected = Backbone(model, "encoder")(**tokenize.encode(TEXTS)).layer(2)
    assert (backbone(**packed).layer(2) - expected).abs().max() <= 1e-5
