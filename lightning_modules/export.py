"""Export one (depth, dim, rank) cell of a 3D-ML run as a plain Hugging Face / sentence-transformers model.

``python -m lightning_modules.export CKPT --layers l --dim d --rank r --out DIR [--mode compat|factorized]``
(or ``make export CKPT=... LAYERS=l DIM=d RANK=r OUT=DIR [MODE=...]``) writes a folder that loads with
``SentenceTransformer(DIR)`` and ``AutoModel.from_pretrained(DIR)`` on a machine without this project:

- the backbone cut to its first ``l`` blocks (``num_hidden_layers`` updated);
- the token embedding at rank ``r``: ``compat`` mode merges ``U[:, :r] · V[:r]`` into an ordinary embedding matrix;
  ``factorized`` mode keeps ``U[:, :r]`` and ``V[:r]`` (``vocab·r + r·d`` parameters) and ships a short
  ``modeling_factorized.py`` that transformers imports with ``trust_remote_code=True``;
- sentence-transformers modules: Transformer → Pooling (mean for encoders, last token for decoders, whose
  tokenizer is saved to append EOS) → the first ``d`` coordinates → L2 normalisation; ``truncate_dim = d``,
  the query / passage prompts of the run, cosine similarity;
- the tokenizer and a model card (cell, parameter counts of both modes, probe scores of the cell if the run
  has a probe table).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from lightning_modules.plugins import MEL, MLL, MRL
from lightning_modules.plugins.mel import FactorizedEmbedding
from lightning_modules.plugins.precision import LEVELS, Precision
from lightning_modules.views import vector_bytes, view_name

MODES = ("compat", "factorized")
FACTORIZED_CODE_FILE = "modeling_factorized.py"

# Written next to a factorized export; transformers imports it with trust_remote_code=True. It must not import
# this project: the folder has to load anywhere transformers is installed.
FACTORIZED_CODE = '''"""Token embedding kept as two factors, E[ids] = U[ids] @ V (matryoshka-lab, MODE=factorized).

Load with ``AutoModel.from_pretrained(path, trust_remote_code=True)`` or
``SentenceTransformer(path, trust_remote_code=True)``; ``config.matryoshka_rank`` is the rank r. The model type
``{model_type}`` is unknown to transformers on purpose: loading without this file fails instead of silently
building a random full-size embedding.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import {config_base} as _BaseConfig
from transformers import {base} as _Base


class {config_name}(_BaseConfig):
    model_type = "{model_type}"


class FactorizedEmbedding(nn.Module):
    """``left``: [vocab, r] (U·S), ``right``: [r, d] (V); rows are gathered before the product."""

    def __init__(self, num_embeddings: int, rank: int, embedding_dim: int) -> None:
        super().__init__()
        self.left = nn.Parameter(torch.zeros(num_embeddings, rank))
        self.right = nn.Parameter(torch.zeros(rank, embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.left) @ self.right


class {name}(_Base):
    config_class = {config_name}

    def __init__(self, config) -> None:
        super().__init__(config)
        self.set_input_embeddings(FactorizedEmbedding(config.vocab_size, config.matryoshka_rank, config.hidden_size))
'''


def _update_json(path: Path, **updates) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **updates}, indent=2, ensure_ascii=False))


class ExportError(ValueError):
    """An export request that cannot be served; the message names the argument and the allowed values."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """A deployable model of a 3D-ML run: the first ``layers`` blocks, the first ``dim`` coordinates of the
    embedding, the token embedding at ``rank`` (None: the run has no MEL, the embedding is the model's own)."""

    layers: int
    dim: int
    rank: int | None

    @property
    def name(self) -> str:
        tags = {"layer": self.layers, "dim": self.dim} | ({"rank": self.rank} if self.rank is not None else {})
        return view_name(tags)


@dataclasses.dataclass
class ExportResult:
    path: Path
    cell: Cell
    mode: str
    parameters: dict[str, int | None]
    """Parameters of the exported transformer in each mode (``factorized`` is None without MEL)."""


@dataclasses.dataclass
class LoadedRun:
    """A trained module rebuilt from its run folder, in eval mode."""

    module: object  # MatryoshkaEmbedder
    tokenize: object  # BatchTokenizer
    config: DictConfig
    run_dir: Path
    checkpoint: Path
    global_step: int


def _known_keys(schema: DictConfig, loaded: dict, prefix: str = "") -> dict:
    """``loaded`` without the keys the current schema no longer has (a run config can be older than the code);
    open sections (``plugins``, ``trainer``) are kept whole. Dropped keys are reported on stderr."""
    kept = {}
    for key, value in loaded.items():
        if key not in schema:
            print(f"export: ignoring `{prefix}{key}` of the run config (not in the current schema)", file=sys.stderr)
        elif isinstance(value, dict) and dataclasses.is_dataclass(OmegaConf.get_type(schema, key)):
            kept[key] = _known_keys(schema[key], value, f"{prefix}{key}.")
        else:
            kept[key] = value
    return kept


def load_run(checkpoint: str | Path) -> LoadedRun:
    """Rebuilds the module of ``<run_dir>/checkpoints/<name>.ckpt`` from ``<run_dir>/config.yaml``, loads its
    weights and puts it in eval mode.

    Args:
        checkpoint: a Lightning checkpoint written by ``experiments.run.train``.
    """
    from experiments.config import Config
    from experiments.run import build

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        raise ExportError(f"CKPT {checkpoint} is a sharded (FSDP2) checkpoint folder; export reads one file: train "
                          f"with distributed.sharded_checkpoint=false")
    if not checkpoint.is_file():
        raise ExportError(f"CKPT {checkpoint}: no such checkpoint file")
    run_dir = checkpoint.parent.parent
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ExportError(f"CKPT {checkpoint}: no run config at {config_file} (expected <run_dir>/checkpoints/*.ckpt)")
    schema = OmegaConf.structured(Config)
    # Typed like a composed config; build() validates the model and plugin sections again.
    config = OmegaConf.merge(schema, _known_keys(schema, OmegaConf.to_container(OmegaConf.load(config_file))))
    module, datamodule = build(config)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])
    return LoadedRun(module.eval(), datamodule.tokenize, config, run_dir, checkpoint, int(state.get("global_step", 0)))


def _plugin(module, plugin_type):
    return next((plugin for plugin in module.plugins if isinstance(plugin, plugin_type)), None)


def trained_ladders(module) -> dict[str, list]:
    """The values each axis was trained on: ``{"layers": [...], "dims": [...], "ranks": [...]}``.

    An axis without its plugin has one value: the full depth, the full width, or rank None (no MEL).
    """
    info = module.backbone.info
    mll, mrl, mel = _plugin(module, MLL), _plugin(module, MRL), _plugin(module, MEL)
    return {"layers": mll.layers if mll else [info.num_layers],
            "dims": mrl.dims if mrl else [info.hidden_size],
            "ranks": mel.ranks if mel else [None]}


def resolve_cell(module, layers: int | None = None, dim: int | None = None, rank: int | None = None) -> Cell:
    """The requested cell, defaults filled (full depth, full width, the largest trained rank), checked against
    what the run trained; an invalid value raises :class:`ExportError` naming the argument and what is allowed."""
    info = module.backbone.info
    ladders = trained_ladders(module)
    layers = info.num_layers if layers is None else layers
    dim = info.hidden_size if dim is None else dim
    if not 1 <= layers <= info.num_layers:
        raise ExportError(f"LAYERS={layers} outside [1, {info.num_layers}] (the model's depth); "
                          f"trained exits: {ladders['layers']}")
    if layers not in ladders["layers"]:
        raise ExportError(f"LAYERS={layers} is not a trained exit; choose one of {ladders['layers']}")
    if not 1 <= dim <= info.hidden_size:
        raise ExportError(f"DIM={dim} outside [1, {info.hidden_size}] (the model's hidden size); "
                          f"trained dims: {ladders['dims']}")
    if dim not in ladders["dims"]:
        raise ExportError(f"DIM={dim} is not a trained dim; choose one of {ladders['dims']}")
    if ladders["ranks"] == [None]:
        if rank is not None:
            raise ExportError(f"RANK={rank} not available: the run has no MEL plugin (its embedding is full-rank); "
                              f"leave RANK empty")
    elif rank is None:
        rank = ladders["ranks"][0]
    elif rank not in ladders["ranks"]:
        raise ExportError(f"RANK={rank} is not in the run's MEL ladder; choose one of {ladders['ranks']}")
    return Cell(layers, dim, rank)


@torch.no_grad()
def cell_embeddings(run: LoadedRun, texts: list[str], cell: Cell, prompt: str = "query") -> Tensor:
    """What training computes at ``cell`` (the reference an export must reproduce): the pooled exit of block
    ``layers`` with the token embedding at ``rank``, its first ``dim`` coordinates, L2-normalised.

    Args:
        prompt: ``query`` or ``passage``: which of the run's prefixes is prepended.
    """
    tokenize = run.tokenize
    prefix = tokenize.query_prefix if prompt == "query" else tokenize.passage_prefix
    batch = tokenize.encode([prefix + text for text in texts])
    embedding = run.module.backbone.input_embeddings()
    saved_rank = getattr(embedding, "rank", None)
    if cell.rank is not None:
        embedding.rank = cell.rank
    try:
        bundle = run.module.backbone(batch["input_ids"], batch["attention_mask"])
        return F.normalize(bundle.layer(cell.layers)[:, : cell.dim], dim=-1)
    finally:
        if cell.rank is not None:
            embedding.rank = saved_rank


def _cut(model: nn.Module, layers: int, embedding: nn.Module | None) -> nn.Module:
    """A copy of ``model`` with its first ``layers`` blocks (config updated) and ``embedding`` as token embedding
    (None: a copy of its own)."""
    depth = model.config.num_hidden_layers
    cut = copy.deepcopy(model)
    # The block list is the one ModuleList with one entry per layer (``encoder.layer``, ``layers``, ...).
    blocks = [name for name, child in cut.named_modules() if isinstance(child, nn.ModuleList) and len(child) == depth]
    if len(blocks) != 1:
        raise ExportError(f"cannot find the block list of {type(model).__name__} "
                          f"(ModuleLists of length {depth}: {blocks})")
    cut.set_submodule(blocks[0], cut.get_submodule(blocks[0])[:layers])
    cut.config.num_hidden_layers = layers
    if getattr(cut.config, "layer_types", None):  # per-layer attention types must match the depth
        cut.config.layer_types = cut.config.layer_types[:layers]
    if embedding is not None:
        cut.set_input_embeddings(embedding)
    return cut


def _parameter_counts(cut: nn.Module, info, rank: int | None) -> dict[str, int | None]:
    embedding_parameters = sum(p.numel() for p in cut.get_input_embeddings().parameters())
    body = sum(p.numel() for p in cut.parameters()) - embedding_parameters
    return {"compat": body + info.vocab_size * info.hidden_size,
            "factorized": None if rank is None else body + rank * (info.vocab_size + info.hidden_size)}


def _export_tokenizer(tokenize, out: Path) -> None:
    """Saves the training tokenizer so that plain ``tokenizer(texts)`` reproduces the training batches."""
    tokenizer = copy.deepcopy(tokenize.tokenizer)  # the run's own tokenizer keeps its settings
    tokenizer.model_max_length = tokenize.max_length
    if tokenize.family == "decoder":
        # Training appends EOS to every text and pools it (kept in the mask even when eos == pad), on the right.
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.add_bos_token, tokenizer.add_eos_token = False, True
    tokenizer.save_pretrained(out)
    if tokenize.family == "decoder":
        # Also written as options: tokenizer classes that rebuild their post-processor from them on load
        # (Llama/Qwen style) then append EOS too, instead of dropping the saved one.
        _update_json(out / "tokenizer_config.json", add_bos_token=False, add_eos_token=True, padding_side="right")


def export_cell(run: LoadedRun, out: str | Path, layers: int | None = None, dim: int | None = None,
                rank: int | None = None, mode: str = "compat") -> ExportResult:
    """Writes the cell ``(layers, dim, rank)`` of ``run`` to ``out`` as a Hugging Face + sentence-transformers folder.

    Args:
        run: from :func:`load_run`.
        out: output folder (created; existing files of the same names are overwritten).
        layers, dim, rank: the cell; None picks the full depth, the full width, the largest trained rank.
        mode: ``compat`` (plain embedding matrix ``U[:, :r]·V[:r]``; loads with no extra code) or
            ``factorized`` (keeps ``U[:, :r]``, ``V[:r]``; loads with ``trust_remote_code=True``).

    Example:
        >>> run = load_run("outputs/quickstart/<timestamp>/checkpoints/last.ckpt")
        >>> export_cell(run, "exports/l2-d128-r64", layers=2, dim=128, rank=64)
        >>> SentenceTransformer("exports/l2-d128-r64").encode_query(["Wie spät ist es?"])  # shape [1, 128]
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers.utils import logging as transformers_logging

    if mode not in MODES:
        raise ExportError(f"MODE={mode!r} not allowed; choose one of {', '.join(MODES)}")
    module, info = run.module, run.module.backbone.info
    cell = resolve_cell(module, layers, dim, rank)
    embedding = module.backbone.input_embeddings()
    if mode == "factorized" and cell.rank is None:
        raise ExportError("MODE=factorized needs a run trained with MEL (a factorised embedding); use MODE=compat")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    token_embedding = None  # without MEL the model keeps its own embedding
    with torch.no_grad():
        if cell.rank is not None and mode == "compat":
            token_embedding = nn.Embedding.from_pretrained(
                embedding.merged_weight(cell.rank), freeze=False,
                padding_idx=getattr(module.backbone.model.config, "pad_token_id", None))
        elif cell.rank is not None:
            token_embedding = FactorizedEmbedding(embedding.left[:, : cell.rank].clone(),
                                                  embedding.right[: cell.rank].clone())
    cut = _cut(module.backbone.model, cell.layers, token_embedding)
    parameters = _parameter_counts(cut, info, cell.rank)
    cut.save_pretrained(out)
    if mode == "factorized":
        names = {"base": type(cut).__name__, "config_base": type(cut.config).__name__,
                 "model_type": f"{cut.config.model_type}_factorized"}
        names |= {"name": f"Factorized{names['base']}", "config_name": f"Factorized{names['config_base']}"}
        (out / FACTORIZED_CODE_FILE).write_text(FACTORIZED_CODE.format(**names))
        code = FACTORIZED_CODE_FILE.removesuffix(".py")
        _update_json(out / "config.json", model_type=names["model_type"], architectures=[names["name"]],
                     matryoshka_rank=cell.rank,
                     auto_map={"AutoConfig": f"{code}.{names['config_name']}", "AutoModel": f"{code}.{names['name']}"})
    _export_tokenizer(run.tokenize, out)

    # Load what was just written, as a user would, and add the sentence-transformers modules around it.
    trust = {"trust_remote_code": True} if mode == "factorized" else {}
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the load report lists the heads handled just below
    try:
        transformer = Transformer(str(out), max_seq_length=run.tokenize.max_length, model_kwargs=trust,
                                  config_kwargs=trust, processor_kwargs=trust)
    finally:
        transformers_logging.set_verbosity(verbosity)
    # Heads the class adds that the run never had (BERT's pooler) are saved as zeros rather than random numbers.
    loaded = transformer.auto_model.state_dict()
    with torch.no_grad():
        for key in set(loaded) - set(cut.state_dict()):
            loaded[key].zero_()
    pooling = Pooling(info.hidden_size, "lasttoken" if info.family == "decoder" else "mean")
    modules = [transformer, pooling]
    if cell.dim < info.hidden_size:
        # Truncate BEFORE normalising (as the loss does): a fixed selection of the first d coordinates, exact in fp32.
        modules.append(Dense(info.hidden_size, cell.dim, bias=False, activation_function=None,
                             init_weight=torch.eye(info.hidden_size)[: cell.dim].clone()))
    modules.append(Normalize())
    prompts = {name: prefix for name, prefix in (("query", run.tokenize.query_prefix),
                                                 ("document", run.tokenize.passage_prefix)) if prefix}
    model = SentenceTransformer(modules=modules, prompts=prompts, similarity_fn_name="cosine",
                                truncate_dim=cell.dim, device="cpu")
    model.save(str(out), create_model_card=False)
    result = ExportResult(out, cell, mode, parameters)
    (out / "README.md").write_text(model_card(run, result))
    return result


def find_probe_table(run_dir: Path) -> Path | None:
    """The newest ``probe*.csv`` / ``probe*.json`` under the run folder, if the run was probed."""
    tables = [path for pattern in ("probe*.csv", "probe*.json") for path in run_dir.rglob(pattern)]
    return max(tables, key=lambda path: path.stat().st_mtime) if tables else None


def probe_scores(table: Path, cell: Cell) -> dict[str, float]:
    """Scores of ``cell`` at the table's last step.

    The table is rows with ``layer``, ``dim``, optionally ``rank`` and ``step``, and one or more numeric score
    columns (CSV with a header, or JSON: a list of row objects or ``{"rows": [...]}``).
    """
    if table.suffix == ".csv":
        with table.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        data = json.loads(table.read_text())
        rows = data["rows"] if isinstance(data, dict) else data

    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    def matches(row: dict) -> bool:
        rank = number(row.get("rank"))
        return (number(row.get("layer")) == cell.layers and number(row.get("dim")) == cell.dim
                and (cell.rank is None or rank is None or rank == cell.rank))

    rows = [row for row in rows if matches(row)]
    if not rows:
        return {}
    last = max(number(row.get("step")) or 0.0 for row in rows)
    scores = {}
    for row in rows:
        if (number(row.get("step")) or 0.0) != last:
            continue
        task = row.get("task")
        # Text columns besides the task are the tags of other axes (precision: fp32 | int8 | binary).
        other_tags = "".join(f" [{key} {value}]" for key, value in row.items()
                             if key not in ("task", "rank") and value and number(value) is None)
        for key, value in row.items():
            if key not in ("layer", "dim", "rank", "step", "task", "bytes") and number(value) is not None:
                scores[(f"{task}/{key}" if task else key) + other_tags] = number(value)
    return scores


# The stored vectors the probe scores for the precision axis (lightning_modules/plugins/precision.py), in numpy.
QUANTIZE_SNIPPET = """\
import numpy as np

e = model.encode_document(texts)  # float32, L2-normalised: [n, dim]
codes = np.round(127 * e / np.abs(e).max(axis=1, keepdims=True)).astype(np.int8)  # int8: compare by cosine
bits = np.packbits(e >= 0, axis=1)  # binary: rank by Hamming distance (bitwise XOR, then count the ones)"""


def _quantized_storage(precision: Precision, dim: int) -> list[str]:
    """The model card's section on int8 and binary vectors of a run trained with the precision axis."""
    rows = [f"| {level} | {weight:g} | {vector_bytes(dim, LEVELS[level][1])} |"
            for level, weight in zip(precision.levels, precision.weights)]
    return ["", "## Storing int8 or binary vectors", "",
            "The run has the precision axis: a level with a non-zero loss weight was trained on its quantized vectors "
            "(straight-through gradients), one with weight 0 only probed"
            + (f", as were codes under {precision.min_bytes} bytes" if precision.min_bytes else "")
            + ". The probe scores below are labelled by precision.", "",
            "| precision | loss weight | bytes per vector |", "|---|---|---|", *rows, "",
            "The stored vectors the probe scored (int8: per vector, 255 symmetric levels of its largest coordinate; "
            "binary: the sign bits):", "", "```python", QUANTIZE_SNIPPET, "```"]


def _millions(count: int | None) -> str:
    return "n/a (no MEL)" if count is None else f"{count / 1e6:.2f} M ({count:,})"


def model_card(run: LoadedRun, result: ExportResult) -> str:
    """The README of an exported folder."""
    config, cell, info = run.config, result.cell, run.module.backbone.info
    ladders = trained_ladders(run.module)
    pooling = ("last token (EOS appended by the tokenizer)" if info.family == "decoder"
               else "mean over the attention mask")
    rank = "full (no MEL)" if cell.rank is None else str(cell.rank)
    load_args = ", trust_remote_code=True" if result.mode == "factorized" else ""
    lines = [
        "---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, matryoshka, 3d-matryoshka]", "---", "",
        f"# {config.name}: cell {cell.name}", "",
        f"One deployable cell of a 3D Matryoshka (MRL × MLL × MEL) run of matryoshka-lab, exported in "
        f"`{result.mode}` mode.",
        "",
        "| | value | trained values |", "|---|---|---|",
        f"| depth (blocks kept) | {cell.layers} of {info.num_layers} | {ladders['layers']} |",
        f"| embedding dim | {cell.dim} of {info.hidden_size} | {ladders['dims']} |",
        f"| token-embedding rank | {rank} | {ladders['ranks']} |",
        "",
        f"- Backbone: `{config.model.source}`{f' ({config.model.path})' if config.model.path else ''}, "
        f"{info.family}, vocab {info.vocab_size:,}; pooling: {pooling}; output L2-normalised, cosine similarity.",
        f"- Prompts: query `{run.tokenize.query_prefix!r}`, passage/document `{run.tokenize.passage_prefix!r}`; "
        f"max {run.tokenize.max_length} tokens.",
        f"- Source: `{run.checkpoint}` (step {run.global_step}).",
        "",
        "## Parameters (transformer, this depth)", "",
        "| mode | parameters |", "|---|---|",
        f"| compat (merged embedding matrix) | {_millions(result.parameters['compat'])} |",
        f"| factorized (U[:, :r], V[:r]) | {_millions(result.parameters['factorized'])} |",
        "",
        "## Usage", "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("path/to/this/folder"{load_args})',
        'queries = model.encode_query(["..."])      # query prompt applied',
        'passages = model.encode_document(["..."])  # passage prompt applied',
        "scores = model.similarity(queries, passages)",
        "```", "",
        f"Plain transformers: `AutoModel.from_pretrained(path{load_args})` returns the cut backbone; pool as above, "
        f"keep the first {cell.dim} coordinates, then L2-normalise.",
    ]
    if result.mode == "factorized":
        lines += ["", f"The token embedding is stored as two factors (`{FACTORIZED_CODE_FILE}`, imported by "
                      "transformers with `trust_remote_code=True`): `E[ids] = U[ids] @ V`."]
    precision = _plugin(run.module, Precision)
    if precision is not None:
        lines += _quantized_storage(precision, cell.dim)
    table = find_probe_table(run.run_dir)
    scores = probe_scores(table, cell) if table else {}
    lines += ["", "## Probe scores", ""]
    if scores:
        lines += [f"From `{table}`:", "", "| metric | score |", "|---|---|",
                  *(f"| {metric} | {value:.4f} |" for metric, value in sorted(scores.items()))]
    else:
        lines.append("No probe table for this cell in the run folder.")
    return "\n".join(lines) + "\n"


def load_exported(path: str | Path):
    """``SentenceTransformer`` of an exported folder (either mode)."""
    from sentence_transformers import SentenceTransformer

    path = Path(path)
    return SentenceTransformer(str(path), device="cpu", trust_remote_code=(path / FACTORIZED_CODE_FILE).is_file())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_modules.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="outputs/<NAME>/<timestamp>/checkpoints/last.ckpt")
    parser.add_argument("--layers", type=int, help="blocks to keep (default: all)")
    parser.add_argument("--dim", type=int, help="embedding width (default: the hidden size)")
    parser.add_argument("--rank", type=int,
                        help="token-embedding rank (default: the largest trained; none without MEL)")
    parser.add_argument("--mode", default="compat", choices=MODES)
    parser.add_argument("--out", help="output folder (default: <run_dir>/export/<cell>-<mode>)")
    parser.add_argument("--no-check", action="store_true", help="skip comparing the export with the training model")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from experiments.config import ConfigError

    try:
        run = load_run(args.checkpoint)
        cell = resolve_cell(run.module, args.layers, args.dim, args.rank)  # fail fast, before writing anything
        out = Path(args.out) if args.out else run.run_dir / "export" / f"{cell.name.replace('/', '-')}-{args.mode}"
        result = export_cell(run, out, cell.layers, cell.dim, cell.rank, args.mode)
    except (ExportError, ConfigError) as error:
        print(f"export error: {error}", file=sys.stderr)
        return 2
    print(f"exported cell {result.cell.name} ({result.mode}) to {result.path}")
    for mode, count in result.parameters.items():
        print(f"  parameters, {mode:<10}: {_millions(count)}")
    if not args.no_check:
        texts = ["The file could not be opened.", "Die Datei konnte nicht geöffnet werden.", "Fichier introuvable"]
        exported = load_exported(result.path).encode_query(texts, convert_to_tensor=True)
        difference = (exported - cell_embeddings(run, texts, result.cell, "query")).abs().max().item()
        print(f"  check: max |export - training| over {len(texts)} texts = {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
