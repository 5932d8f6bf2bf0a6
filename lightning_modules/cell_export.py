"""Export one cell of a trained run as a plain Hugging Face / sentence-transformers model.

The CLI is ``python -m experiments.export`` (``make export CKPT=... CELL=layer_2/dim_64/rank_64``); the folder it
writes loads with ``SentenceTransformer(DIR)`` and ``AutoModel.from_pretrained(DIR)`` on a machine without this
project:

- the backbone cut to the cell's depth (``num_hidden_layers`` updated);
- every model-side axis writes its setting into that copy (MEL: the token embedding at rank ``r``, merged
  ``U[:, :r] · V[:r]`` in ``compat`` mode; FFN: the sliced projections and a smaller ``intermediate_size``); an
  axis may offer export modes of its own (``export_modes``: MEL's ``factorized`` keeps the two factors with a short
  modeling file for ``trust_remote_code=True``);
- sentence-transformers modules: Transformer → Pooling (mean for encoders, last token for decoders, whose
  tokenizer is saved to append EOS) → the first ``dim`` coordinates → L2 normalisation; ``truncate_dim = dim``,
  the query / passage prompts of the run, cosine similarity;
- the tokenizer and a model card (cell, parameters, every axis' notes, probe scores of the cell if the run has a
  probe table).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from contracts.cells import Cell, axis_values
from lightning_modules.embedding_model import EmbeddingModel, TextTokenizer
from lightning_modules.plugins import BUILTIN_PLUGINS

COMPAT = "compat"  # plain modules only: every axis can write its setting so
# Every mode a built-in axis offers (what the CLI accepts); a run allows compat and those of its own axes.
MODES = (COMPAT, *sorted({mode for plugin in BUILTIN_PLUGINS.values() for mode in getattr(plugin, "export_modes", ())}))


def _update_json(path: Path, **updates) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **updates}, indent=2, ensure_ascii=False))


class ExportError(ValueError):
    """An export request that cannot be served; the message names the argument and the allowed values."""


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where an exported cell comes from, for its model card."""

    name: str
    backbone: str
    checkpoint: Path | None
    global_step: int
    run_dir: Path | None
    """Searched for the run's newest probe table (None: no scores in the card)."""


@dataclasses.dataclass
class ExportResult:
    path: Path
    cell: Cell
    mode: str
    parameters: int
    """Parameters of the exported transformer."""


def _cut(model: nn.Module, layers: int) -> nn.Module:
    """A copy of ``model`` with its first ``layers`` blocks (config updated)."""
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
    return cut


def _export_tokenizer(tokenize: TextTokenizer, out: Path) -> None:
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


def check_out(out: Path, overwrite: bool) -> None:
    """ExportError unless ``out`` is a new or empty folder, or ``overwrite`` is set."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT={out} is a file, not a folder; choose a new folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"OUT={out} exists and is not empty; choose a new folder or pass --overwrite "
                          f"(make export ... ARGS=--overwrite)")


def export_cell(model: EmbeddingModel, out: str | Path, cell: Cell, origin: Origin, mode: str = "compat",
                overwrite: bool = False) -> ExportResult:
    """Writes ``cell`` of ``model`` to ``out`` as a Hugging Face + sentence-transformers folder.

    Args:
        model: the trained model (``experiments.loading.load_run(...).model``).
        out: output folder; it must not exist or be empty, unless ``overwrite`` (then only the files an export
            writes are replaced).
        cell: one of ``model.cells()``.
        origin: the run it comes from, for the model card.
        mode: ``compat`` (plain modules only; loads with no extra code) or ``factorized`` (an axis with a compact
            form keeps it, e.g. MEL's two factors; loads with ``trust_remote_code=True``).

    Example:
        >>> run = load_run("outputs/quickstart/<timestamp>/checkpoints/last.ckpt")  # experiments.loading
        >>> export_cell(run.model, "exports/l2-d128-r64", run.model.cell("layer_2/dim_128/rank_64"), run.origin())
        >>> SentenceTransformer("exports/l2-d128-r64").encode_query(["Wie spät ist es?"])  # shape [1, 128]
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers.utils import logging as transformers_logging

    module, info = model.module, model.module.backbone.info
    axes = module.model_side
    offered = {COMPAT} | {offered for axis in axes for offered in axis.export_modes}
    if mode not in offered:
        axes_with_it = [name.upper() for name, plugin in BUILTIN_PLUGINS.items()
                        if mode in getattr(plugin, "export_modes", ())]
        if axes_with_it:
            raise ExportError(f"MODE={mode} needs an axis with a {mode} form ({', '.join(axes_with_it)}); this run "
                              f"has none: use MODE={COMPAT}")
        raise ExportError(f"MODE={mode!r} not allowed; choose one of {', '.join(MODES)}")
    if cell.name not in {known.name for known in model.cells()}:
        raise ExportError(f"CELL={cell.name} is not a cell of this run")
    out = Path(out)
    check_out(out, overwrite)
    cut = _cut(module.backbone.model, cell.layer)
    files: dict[str, str] = {}
    config_updates: dict[str, object] = {}
    for axis in axes:
        extra_files, updates = axis.export(cut, cell.tags[axis.tag], mode)
        files |= extra_files
        config_updates |= updates
    parameters = sum(p.numel() for p in cut.parameters())
    out.mkdir(parents=True, exist_ok=True)
    cut.save_pretrained(out)
    for name, text in files.items():
        (out / name).write_text(text)
    if config_updates:
        _update_json(out / "config.json", **config_updates)
    _export_tokenizer(model.tokenize, out)

    # Load what was just written, as a user would, and add the sentence-transformers modules around it.
    trust = {"trust_remote_code": True} if files else {}
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the load report lists the heads handled just below
    try:
        transformer = Transformer(str(out), max_seq_length=model.tokenize.max_length, model_kwargs=trust,
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
    prompts = {name: prefix for name, prefix in (("query", model.tokenize.query_prefix),
                                                 ("document", model.tokenize.passage_prefix)) if prefix}
    sentence_model = SentenceTransformer(modules=modules, prompts=prompts, similarity_fn_name="cosine",
                                         truncate_dim=cell.dim, device="cpu")
    sentence_model.save(str(out), create_model_card=False)
    result = ExportResult(out, cell, mode, parameters)
    (out / "README.md").write_text(model_card(model, result, origin))
    return result


def find_probe_table(run_dir: Path) -> Path | None:
    """The newest ``probe*.csv`` / ``probe*.json`` under the run folder, if the run was probed."""
    tables = [path for pattern in ("probe*.csv", "probe*.json") for path in run_dir.rglob(pattern)]
    return max(tables, key=lambda path: path.stat().st_mtime) if tables else None


def probe_scores(table: Path, cell: Cell) -> dict[str, float]:
    """Scores of ``cell`` at the table's last step.

    The table is rows with the cell's tags as columns (``layer``, ``dim``, ``rank``, ...; a column a row leaves
    empty or a table lacks matches any value), optionally ``step`` and ``task``, and numeric score columns (CSV with
    a header, or JSON: a list of row objects or ``{"rows": [...]}``). Rows that differ only in a tag the cell does
    not have (precision levels) are reported apart, labelled ``[tag value]``.
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

    def same(value, wanted) -> bool:
        return value in (None, "") or (number(value) == wanted if number(value) is not None else value == str(wanted))

    rows = [row for row in rows if all(same(row.get(key), value) for key, value in cell.tags.items())]
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
                             if key != "task" and key not in cell.tags and value and number(value) is None)
        for key, value in row.items():
            if key not in cell.tags and key not in ("step", "task", "bytes") and number(value) is not None:
                scores[(f"{task}/{key}" if task else key) + other_tags] = number(value)
    return scores


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f} M ({count:,})"


def model_card(model: EmbeddingModel, result: ExportResult, origin: Origin) -> str:
    """The README of an exported folder."""
    cell, info, tokenize = result.cell, model.module.backbone.info, model.tokenize
    values = axis_values(model.cells())
    pooling = ("last token (EOS appended by the tokenizer)" if info.family == "decoder"
               else "mean over the attention mask")
    load_args = ", trust_remote_code=True" if _remote_code(result.path) else ""
    lines = [
        "---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, matryoshka, 3d-matryoshka]", "---", "",
        f"# {origin.name}: cell {cell.name}", "",
        f"One deployable cell of a Matryoshka run of matryoshka-lab, exported in `{result.mode}` mode.",
        "",
        "| axis | this cell | trained values |", "|---|---|---|",
        *(f"| {key} | {value} | {values[key]} |" for key, value in cell.tags.items()),
        "",
        f"- Backbone: `{origin.backbone}`, {info.family}, {info.num_layers} blocks, hidden {info.hidden_size}, vocab "
        f"{info.vocab_size:,}; pooling: {pooling}; output L2-normalised, cosine similarity.",
        f"- Prompts: query `{tokenize.query_prefix!r}`, passage/document `{tokenize.passage_prefix!r}`; "
        f"max {tokenize.max_length} tokens.",
        f"- Source: `{origin.checkpoint}` (step {origin.global_step}).",
        f"- Parameters of the exported transformer: {_millions(result.parameters)}.",
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
    for plugin in model.module.plugins:
        lines += plugin.card_lines(cell)
    table = find_probe_table(origin.run_dir) if origin.run_dir is not None else None
    scores = probe_scores(table, cell) if table else {}
    lines += ["", "## Probe scores", ""]
    if scores:
        lines += [f"From `{table}`:", "", "| metric | score |", "|---|---|",
                  *(f"| {metric} | {value:.4f} |" for metric, value in sorted(scores.items()))]
    else:
        lines.append("No probe table for this cell in the run folder.")
    return "\n".join(lines) + "\n"


def _remote_code(path: Path) -> str:
    """The modeling file an export ships for ``trust_remote_code`` (named in its config's ``auto_map``), or ""."""
    auto_map = json.loads((path / "config.json").read_text()).get("auto_map", {})
    return next(iter(auto_map.values()), "").split(".")[0] + ".py" if auto_map else ""


def load_exported(path: str | Path):
    """``SentenceTransformer`` of an exported folder (either mode)."""
    from sentence_transformers import SentenceTransformer

    path = Path(path)
    return SentenceTransformer(str(path), device="cpu", trust_remote_code=bool(_remote_code(path)))


if __name__ == "__main__":  # a library module: say where its command is instead of doing nothing
    import sys

    print("lightning_modules.cell_export is the export library, not a command; export a cell with: "
          "python -m experiments.export CKPT [--cell NAME] (make export CKPT=... CELL=...; --help lists the options)",
          file=sys.stderr)
    sys.exit(2)
