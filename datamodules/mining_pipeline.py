"""Hard-negative mining of an experiment's training sources into a folder, resumable (the command, which loads
the model: :mod:`experiments.mine`, ``make mine SOURCE=NAME``).

Mines hard negatives for every training source of experiment ``NAME`` (the locales of a built-in corpus, built
on demand as training builds it, or the files of a ``folder`` corpus) with the recipe of the ML-Embed data
(:mod:`datamodules.mining_recipe`), from any ``encoder(texts, role)``.

Output, in the paper's folder layout (``data.corpus=folder``)::

    <out>/<source>.jsonl        {"query", "passage", "negative_1" … "negative_<keep>"}; a row has at least
                                min_negatives negatives, missing ones are null (the loader drops them)
    <out>/sources.yaml          {<source>: {task: retrieval, language: ...}}
    <out>/report.json, report.md  per source: queries, candidates, removals per rule, negatives per row,
                                throughput, a sample to read
    <out>/.mining/cache/        encodings (.npy chunks, :mod:`datamodules.mining_cache`), per model;
                                .mining/stats/: per-source results (reports: :mod:`datamodules.mining_report`)

Resumable: encodings are saved chunk by chunk and a source's file is written at once (temporary file and
rename), so re-running a killed command continues where it stopped; a source mined with the same settings is
skipped. Rows with fewer than ``min_negatives`` surviving negatives are left out and counted (default: the
experiment's ``data.negatives.retrieval``): every written row then yields the k negatives training draws, and a
run with ``data.negatives.retrieval=0`` on the same folder sees exactly the same query/passage batches.

Example:
    >>> config, mining = compose_mining("quickstart", ["mine.max_queries=1000"])  # experiments.mine
    >>> mine(config, mining, encoder)  # encoder(texts, role) -> [n, d] embeddings
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from contracts.atomic import write_atomic
from contracts.digest import digest
from datamodules.mining_cache import EmbeddingCache, TextEncoder
from datamodules.mining_recipe import (BACKBONE, OPTION_PREFIX, MiningConfig, TextGroups, pool_passages,
                                       select_negatives, text_key)
from datamodules.mining_report import write_report, write_sidecar
from datamodules.sources import SIDECAR_NAME, DataError, Source, make_row

log = logging.getLogger(__name__)

MINED_DIR = "data/mined"
STATE_DIR = ".mining"  # not a *.jsonl / *.parquet file: the DataModule never reads it as a source
SHOWN_NEGATIVES = 3  # per sample row in the report


def model_fingerprint(config: DictConfig, mining: MiningConfig) -> dict:
    """What decides the encodings, known without loading the model (the cache's and the settings' key)."""
    if mining.model == BACKBONE:
        model = OmegaConf.to_container(config.model, resolve=True) | {"num_layers": None}
        return {"backbone": model, "seed": config.seed}  # the seed initialises the random tiny test backbones
    checkpoint = Path(mining.model).resolve()
    return {"checkpoint": str(checkpoint), "bytes": checkpoint.stat().st_size,
            "mtime_ns": checkpoint.stat().st_mtime_ns}


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


def mining_sources(config: DictConfig) -> dict[str, Source]:
    """The experiment's training sources (a built-in corpus is built first, as training builds it); DataError
    names the key of unusable data."""
    from datamodules.pairs import TranslationPairsDataModule
    from datamodules.sources import corpus_sources, folder_sources

    data = config.data
    TranslationPairsDataModule(data, tokenize=None, seed=config.seed).prepare_data()
    if data.corpus == "folder":
        return folder_sources(Path(data.dir), None if data.sources is None else list(data.sources))
    return corpus_sources(Path(data.dir), list(data.locales), data.direction)


def read_pairs(source: Source) -> tuple[list[tuple[str, str]], Counter]:
    """Every usable ``(query, passage)`` of a source in file order, and the unusable rows per skip reason."""
    pairs, skipped = [], Counter()
    for start, stop, locator in source.blocks:
        for index, values in source.read(int(start), int(stop), int(locator)):
            row = make_row(index, values, 0)
            if isinstance(row, str):
                skipped[row] += 1
            else:
                pairs.append((row.query, row.passage))
    return pairs, skipped


def source_settings(source: Source, mining: MiningConfig, model: dict, seed: int) -> dict:
    """Everything that decides a source's output: a finished source with equal settings is not mined again."""
    recipe = {key: getattr(mining, key) for key in ("top_k", "skip_top", "max_score", "max_ratio", "keep",
                                                    "min_negatives", "max_queries", "max_pool")}
    stat = source.path.stat()
    return {"input": {"path": str(source.path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                      "fields": list(source.fields[:2])},
            "model": model, "recipe": recipe, "seed": seed}


# ---------------------------------------------------------------------------
# Mining
# ---------------------------------------------------------------------------


def mine_source(source: Source, cache: EmbeddingCache, mining: MiningConfig, seed: int) -> tuple[list[dict], dict]:
    """``(output rows, statistics)`` of one source."""
    started = time.perf_counter()
    encoded_before, seconds_before = cache.encoded, cache.seconds
    pairs, unusable = read_pairs(source)
    if not pairs:
        raise DataError(f"{source.path}: no usable row to mine (skipped: {dict(unusable)})", key="data.dir")
    groups = TextGroups(pairs)
    chosen = range(len(pairs))
    if mining.max_queries is not None and len(pairs) > mining.max_queries:
        rng = np.random.default_rng([seed, source.key])
        chosen = np.sort(rng.choice(len(pairs), mining.max_queries, replace=False)).tolist()
    rows = [pairs[i] for i in chosen]
    pool_texts = pool_passages(pairs, rows, mining.max_pool, seed)
    position = {text: i for i, text in enumerate(pool_texts)}
    key_ids: dict[str, int] = {}
    pool_keys = torch.tensor([key_ids.setdefault(text_key(text), len(key_ids)) for text in pool_texts])
    pool_groups = torch.tensor([groups.group(text) for text in pool_texts])

    pool = cache.embed(pool_texts, "passage", source.name)
    queries = cache.embed([query for query, _ in rows], "query", source.name)
    selection = select_negatives(torch.from_numpy(queries), torch.tensor([position[p] for _, p in rows]),
                                 torch.from_numpy(pool), pool_keys, pool_groups, mining)

    written = [i for i, negatives in enumerate(selection.negatives) if len(negatives) >= mining.min_negatives]
    out = []
    for i in written:
        texts = [pool_texts[n] for n in selection.negatives[i]]
        out.append({"query": rows[i][0], "passage": rows[i][1],  # every row has every field: null when missing
                    **{f"negative_{j + 1}": texts[j] if j < len(texts) else None for j in range(mining.keep)}})
    shown = sorted(np.random.default_rng([seed, source.key, 1]).permutation(len(written))[: mining.samples])
    sample = [{"query": rows[i][0], "positive": rows[i][1], "positive_score": round(selection.positive_scores[i], 4),
               "negatives": [{"text": pool_texts[n], "score": round(score, 4)} for n, score in
                             zip(selection.negatives[i][:SHOWN_NEGATIVES], selection.scores[i])]}
              for i in (written[j] for j in shown)]
    per_row = Counter(len(negatives) for negatives in selection.negatives)
    seconds = time.perf_counter() - started
    encoded, encode_seconds = cache.encoded - encoded_before, cache.seconds - seconds_before
    stats = {
        "language": source.language, "input": str(source.path), "rows_in_source": len(pairs),
        "unusable_rows": dict(unusable), "queries": len(rows), "passages_in_source": len({p for _, p in pairs}),
        "pool": len(pool_texts),
        "groups": len(set(pool_groups.tolist())), "largest_group": max(groups.sizes().values(), default=0),
        "candidates": selection.candidates, "candidates_per_query": selection.candidates / max(1, len(rows)),
        "removed": dict(selection.removed), "rows_written": len(out), "rows_too_few_negatives": len(rows) - len(out),
        "negatives_per_row": {str(count): per_row[count] for count in sorted(per_row)},
        "mean_negatives_per_row": sum(len(n) for n in selection.negatives) / max(1, len(rows)),
        "mean_negatives_per_written_row": sum(len(selection.negatives[i]) for i in written) / max(1, len(out)),
        "mean_positive_score": float(np.mean(selection.positive_scores)),
        "texts_encoded": encoded, "encode_seconds": round(encode_seconds, 3), "seconds": round(seconds, 3),
        "queries_per_s": len(rows) / seconds if seconds else 0.0,
        "texts_encoded_per_s": encoded / encode_seconds if encode_seconds else 0.0,
        "sample": sample,
    }
    return out, stats


def mine(config: DictConfig, mining: MiningConfig, encoder: TextEncoder) -> dict:
    """Mines every source of ``config`` into ``mining.out`` (resumable) and writes the report; returns it.

    Args:
        config: the experiment (its ``data`` section names the sources).
        mining: the options.
        encoder: ``(texts, role) -> embeddings`` of ``mining.model``, called only for texts the cache lacks.

    Raises:
        DataError: naming the key (``data.dir``, ``mine.out``, ...) of unusable data or output folder.
    """
    out = Path(mining.out or f"{MINED_DIR}/{config.name}")
    sources = mining_sources(config)
    check_output_folder(out, sources, mining.overwrite)
    model = model_fingerprint(config, mining)
    cache = EmbeddingCache(out / STATE_DIR / "cache" / digest(model),
                           encoder, mining.batch_size, mining.cache_chunk, mining.progress)
    stats_dir = out / STATE_DIR / "stats"
    for name, source in sources.items():
        settings = source_settings(source, mining, model, config.seed)
        stats_file = stats_dir / f"{name}.json"
        done = json.loads(stats_file.read_text(encoding="utf-8")) if stats_file.is_file() else None
        if done is not None and done["settings"] == settings and (out / f"{name}.jsonl").is_file() == bool(
                done["rows_written"]):
            log.info("mining: %s already mined with these settings (%s); skipped", name, out / f"{name}.jsonl")
            continue
        rows, stats = mine_source(source, cache, mining, config.seed)
        if stats["rows_too_few_negatives"] > stats["queries"] / 2:
            rule = max(("skip_top", "max_score", "max_ratio"), key=stats["removed"].get)
            log.warning("mining: %s: %d of %d rows kept fewer than %d negatives; mine.%s removed the most (%.0f per "
                        "query; positives score %.2f on average, so this model's cosines may need other thresholds)",
                        name, stats["rows_too_few_negatives"], stats["queries"], mining.min_negatives, rule,
                        stats["removed"][rule] / stats["queries"], stats["mean_positive_score"])
        target = out / f"{name}.jsonl"
        if rows:
            write_atomic(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        else:
            log.warning("mining: no row of %s kept %d negatives; no file written", name, mining.min_negatives)
            target.unlink(missing_ok=True)
        write_atomic(stats_file, json.dumps({"settings": settings, **stats}, ensure_ascii=False, indent=1))
        write_sidecar(out, stats_dir)
        log.info("mining: %s: %d rows, %.1f queries/s -> %s", name, stats["rows_written"], stats["queries_per_s"],
                 target)
    return write_report(out, stats_dir, config, mining, list(sources))


def check_output_folder(out: Path, sources: dict[str, Source], overwrite: bool) -> None:
    """Refuses an output folder that holds a source being mined, or (unless ``overwrite``) any file this command
    did not write: its reports, ``sources.yaml``, ``.mining/`` and the ``<source>.jsonl`` files it has stats for.

    Raises:
        DataError: naming ``mine.out``, the folder and the files in the way.
    """
    inputs = sorted({source.path.resolve().parent for source in sources.values()})
    if out.resolve() in inputs:
        raise DataError(f"{out} holds the sources being mined; choose another folder (default: {MINED_DIR}/<NAME>)",
                        key=OPTION_PREFIX + "out")
    if overwrite or not out.is_dir():
        return
    mined = {f"{path.stem}.jsonl" for path in (out / STATE_DIR / "stats").glob("*.json")}
    ours = {STATE_DIR, SIDECAR_NAME, "report.json", "report.md", *mined}
    foreign = sorted(path.name for path in out.iterdir() if path.name not in ours and ".tmp-" not in path.name)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DataError(f"{out} holds files mining did not write ({shown}); choose an empty or new folder, or "
                        f"mine.overwrite=true to write beside (and over) them", key=OPTION_PREFIX + "out")
