"""Small files and a text-echoing tokenizer for the DataModule tests (test_data_*.py)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path


def echo(queries, passages, negatives=None) -> dict:
    """A stand-in tokenizer that returns the texts, so tests can see exactly which rows a batch holds."""
    return {"queries": list(queries), "passages": list(passages), "negatives": negatives,
            "num_queries": len(queries), "negatives_per_query": len(negatives[0]) if negatives else 0}


def records(count: int, negatives: int = 0, start: int = 0, tag: str = "") -> list[dict]:
    """Rows ``{"query": "q<tag>7", "passage": "p<tag>7", "negative_1": "n<tag>7_1", ...}``."""
    return [{"query": f"q{tag}{i}", "passage": f"p{tag}{i}", **{f"negative_{j}": f"n{tag}{i}_{j}" for j in
                                                               range(1, negatives + 1)}}
            for i in range(start, start + count)]


def write_jsonl(path: Path, rows: list) -> Path:
    """One line per row: a dict is written as JSON, bytes as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for row in rows:
            out.write(row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode("utf-8"))
            out.write(b"\n")
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 1000, binary: tuple[str, ...] = ()) -> Path:
    """A parquet file with string columns (``binary`` columns as raw bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(rows[0]) if rows else ["query", "passage"]
    columns = {name: pa.array([row.get(name) for row in rows], type=pa.binary() if name in binary else pa.string())
               for name in names}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def row_id(text: str) -> str:
    """``"q7"`` / ``"p7"`` / ``"n7_2"`` -> ``"7"`` (the row a text came from)."""
    return text[1:].split("_")[0]


def folder_config(tmp_path: Path, overrides=()):
    """The ``data`` config of a folder corpus: two sources with hard negatives, one with bad rows scattered through
    it, bucketing on, small pools (so a resume lands inside a pool)."""
    from experiments.config import compose

    data = tmp_path / "data"
    bad = [{"query": "", "passage": "p"}, {"query": "q"}]  # empty text, missing field
    lines = [bad[i % 2] if i % 9 == 4 else row for i, row in enumerate(records(170, negatives=4))]
    write_jsonl(data / "web.jsonl", lines)
    write_parquet(data / "wiki.parquet", records(300, negatives=4, tag="w"), row_group_size=64)
    return compose("tiny", ["data.corpus=folder", f"data.dir={data}", "data.batch_size=4", "data.pool_batches=3",
                            "data.bucketing=true", "data.negatives.retrieval=2", *overrides]).data


def consume(datamodule, count: int) -> list[tuple]:
    """What the training loop sees of ``count`` batches (the DataModule records each one, as in training)."""
    seen = []
    for batch in itertools.islice(datamodule.train_dataloader(), count):
        datamodule.record(batch)
        seen.append((batch["batch_index"], batch["source"], batch["queries"], batch["passages"], batch["negatives"]))
    return seen
