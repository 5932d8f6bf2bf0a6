"""Source formats (parquet, JSONL, gettext, django) and every bad-input case: start-up errors and counted skips."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections import Counter

import pytest

from datamodules.gettext_corpus import SPLITS, load_split
from datamodules.sources import (
    DataError,
    corpus_sources,
    folder_sources,
    make_row,
    open_source,
)
from datamodules.stream import SourceStream, StreamOptions
from experiments.config import ConfigError, compose
from tests.data_helpers import records, write_jsonl, write_parquet


def full_pass(source, batch_size=4, **options):
    """Every batch of one shard's first pass over ``source`` and the skip counts it reported."""
    stream = SourceStream(source, 0, 1, StreamOptions(batch_size, **{"pool_batches": 2, **options}))
    batches, skips = [], Counter()
    while stream.position[0] == 0:
        rows, skipped, _ = stream.next_batch()
        batches.append(rows)
        skips.update(skipped)
    return batches, skips


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_paper_layout_reads_every_row_with_its_negatives(tmp_path, file_format):
    rows = records(40, negatives=3)
    path = tmp_path / f"msmarco.{file_format}"
    write_jsonl(path, rows) if file_format == "jsonl" else write_parquet(path, rows, row_group_size=7)
    source = open_source(path)
    assert (source.name, source.format, source.num_rows) == ("msmarco", file_format, 40)
    assert source.fields == ("query", "passage", "negative_1", "negative_2", "negative_3")
    source.negatives_per_row = 3
    batches, skips = full_pass(source)
    seen = sorted(((r.query, r.passage, tuple(sorted(r.negatives))) for batch in batches for r in batch),
                  key=lambda row: int(row[0][1:]))
    assert seen == [(r["query"], r["passage"], (r["negative_1"], r["negative_2"], r["negative_3"])) for r in rows]
    assert not skips


def test_negative_columns_are_ordered_numerically(tmp_path):
    row = {"negative_10": "n10", "query": "q", "negative_2": "n2", "passage": "p", "negative_1": "n1", "other": "x"}
    source = open_source(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert source.fields == ("query", "passage", "negative_1", "negative_2", "negative_10")


def test_parquet_row_groups_and_blocks_cover_the_file(tmp_path):
    source = open_source(write_parquet(tmp_path / "s.parquet", records(1000), row_group_size=310))
    # 15 rows per block (1000 // 64); a block never crosses a row group: 310 rows = 20 blocks of 15 + one of 10.
    assert source.group_starts.tolist() == [0, 21, 42, 63, 68]
    starts, stops = source.blocks[:, 0], source.blocks[:, 1]
    assert starts[0] == 0 and stops[-1] == 1000 and (starts[1:] == stops[:-1]).all()
    assert source.blocks[20].tolist() == [300, 310, 0] and source.blocks[21].tolist() == [310, 325, 1]
    assert source.read(*source.blocks[22]) == [(i, (f"q{i}", f"p{i}")) for i in range(325, 340)]


def test_jsonl_block_offsets_point_at_their_lines(tmp_path):
    rows = [{"query": "ü" * (i % 5 + 1), "passage": f"p{i}"} for i in range(500)]
    source = open_source(write_jsonl(tmp_path / "s.jsonl", rows))
    assert len(source.blocks) == 72 and source.blocks[-1, 1] == 500  # 7 rows per block (500 // 64)
    for start, stop, offset in source.blocks[[0, 1, 30, -1]]:
        assert [values for _, values in source.read(start, stop, offset)] == \
            [(rows[i]["query"], rows[i]["passage"]) for i in range(start, stop)]


@pytest.mark.parametrize("direction", ["xx2en", "en2xx", "both"])
def test_gettext_corpus_sources(corpus_dir, direction):
    sources = corpus_sources(corpus_dir, ["de", "fr"], direction)
    source = sources["de"]
    assert (source.language, source.task, source.bidirectional) == ("de", "retrieval", direction == "both")
    pairs = load_split(corpus_dir, "train", "de")
    first = pairs[0]
    expected = (first.en, first.xx) if direction == "en2xx" else (first.xx, first.en)
    assert source.num_rows == len(pairs) and source.read(*source.blocks[0])[0] == (0, expected)


def test_unknown_locale_names_the_key_and_close_matches(corpus_dir):
    with pytest.raises(DataError, match=r"'fra' \(closest: fr") as error:
        corpus_sources(corpus_dir, ["de", "fra"], "xx2en")
    assert error.value.key == "data.locales"


def test_django_corpus_is_split_without_leaks(tmp_path):
    pytest.importorskip("django")
    from datamodules.django_corpus import build_django_corpus

    manifest = build_django_corpus(tmp_path / "django", progress=False, locales=["de", "fr", "ja"])
    assert manifest["source"] == "django==5.2.19" and manifest["catalogs_failed"] == []
    assert isinstance(manifest["catalog_dir"], list) and len(manifest["catalog_dir"]) > 5
    english = {split: set() for split in SPLITS}
    for locale in ("de", "fr", "ja"):
        for split in SPLITS:
            pairs = load_split(tmp_path / "django", split, locale)
            english[split] |= {pair.en for pair in pairs}
            assert all("/" in pair.catalog for pair in pairs)  # "admin/django": app and catalog
        assert manifest["locales"][locale]["train"] > 100
    assert all(english.values())
    assert not (english["train"] & english["probe"] or english["train"] & english["test"]
                or english["probe"] & english["test"])
    source = corpus_sources(tmp_path / "django", ["ja"], "xx2en")["ja"]
    batches, _ = full_pass(source, batch_size=8)
    assert len(batches) >= 10


def test_django_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "django", None)  # import django now raises ImportError
    from datamodules.pairs import check_data_config

    with pytest.raises(ConfigError, match=r"`data.corpus`.*pip install --no-deps django==5.2.19"):
        check_data_config(compose("tiny", ["data.corpus=django"]).data)


# ---------------------------------------------------------------------------
# Bad input at start-up: errors naming file, field or key
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_missing_required_column_names_path_and_column(tmp_path, file_format):
    rows = [{"query": "q", "positive": "p"}]
    path = tmp_path / f"bad.{file_format}"
    write_jsonl(path, rows) if file_format == "jsonl" else write_parquet(path, rows)
    with pytest.raises(DataError, match=rf"bad\.{file_format}: missing required field 'passage' .*query, positive"):
        open_source(path)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_jsonl_is_an_error(tmp_path, content):
    (tmp_path / "empty.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file"):
        open_source(tmp_path / "empty.jsonl")


def test_empty_parquet_and_garbage_parquet_are_errors(tmp_path):
    with pytest.raises(DataError, match=r"empty\.parquet: empty file"):
        open_source(write_parquet(tmp_path / "empty.parquet", []))
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"garbage\.parquet: not a readable parquet file"):
        open_source(tmp_path / "garbage.parquet")


def test_jsonl_without_any_object_is_an_error(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", [b"[1, 2]", b"{broken"])
    with pytest.raises(DataError, match=r"s\.jsonl: no JSON object .*line 1: a JSON list"):
        open_source(tmp_path / "s.jsonl")


def test_missing_file_folder_and_unknown_sources(tmp_path):
    with pytest.raises(DataError, match="nothere.jsonl: no such file"):
        open_source(tmp_path / "nothere.jsonl")
    with pytest.raises(DataError, match="no such directory"):
        folder_sources(tmp_path / "nothere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no \*\.parquet or \*\.jsonl files"):
        folder_sources(tmp_path)
    write_jsonl(tmp_path / "msmarco.jsonl", records(3))
    write_parquet(tmp_path / "nq.parquet", records(3))
    with pytest.raises(DataError, match=r"'msmacro' \(closest: msmarco\); 2 available") as error:
        folder_sources(tmp_path, ["nq", "msmacro"])
    assert error.value.key == "data.sources"
    write_parquet(tmp_path / "nq.jsonl", records(3))
    with pytest.raises(DataError, match=r"two files for source 'nq'"):
        folder_sources(tmp_path)


def test_sidecar_declares_tasks_and_languages_and_is_checked(tmp_path):
    write_jsonl(tmp_path / "reviews.jsonl", records(3, negatives=1))
    write_jsonl(tmp_path / "wiki_de.jsonl", records(3))
    sidecar = tmp_path / "sources.yaml"
    sidecar.write_text("reviews: {task: classification}\nwiki_de: {language: de}\n")
    sources = folder_sources(tmp_path)
    assert (sources["reviews"].task, sources["reviews"].language, sources["reviews"].in_batch) == \
        ("classification", "und", False)
    assert (sources["wiki_de"].task, sources["wiki_de"].language) == ("retrieval", "de")
    sidecar.write_text("wiki_fr: {language: fr}\n")
    with pytest.raises(DataError, match=r"'wiki_fr' \(closest: wiki_de\)") as error:
        folder_sources(tmp_path)
    assert error.value.key == str(sidecar)
    sidecar.write_text("reviews: {task: ranking}\n")
    with pytest.raises(DataError, match=r"sources\.yaml: reviews\.task is 'ranking'; choose one of retrieval"):
        folder_sources(tmp_path)
    sidecar.write_text("reviews: {tsak: clustering}\n")
    with pytest.raises(DataError, match=r"sources\.yaml: entry 'reviews' must be a mapping with keys among task"):
        folder_sources(tmp_path)


@pytest.mark.parametrize(("overrides", "key", "message"), [
    (["data.sampling_alpha=-0.5"], "data.sampling_alpha", "must be >= 0"),
    (["data.pool_batches=0"], "data.pool_batches", "must be >= 1"),
    (["data.negatives.ranking=3"], "data.negatives.ranking", "unknown task; allowed: retrieval, clustering"),
    (["data.negatives.retrieval=-1"], "data.negatives.retrieval", "must be >= 0"),
    (["data.caps.xx=10"], "data.caps", r"'xx' \(closest: none\)"),
    (["data.caps.de=0"], "data.caps.de", "must be >= 1"),
    (["data.sources=[de]"], "data.sources", "folder corpus"),
    (["data.corpus=folder", "data.dir=/nonexistent"], "data.dir", "/nonexistent: no such directory"),
])
def test_data_config_errors_name_the_key(overrides, key, message):
    from datamodules.pairs import check_data_config

    with pytest.raises(ConfigError, match=rf"`{key}`.*{message}"):
        check_data_config(compose("tiny", overrides).data)


def test_unknown_locale_stops_before_any_weights_load(corpus_dir):
    from datamodules.pairs import check_data_config

    with pytest.raises(ConfigError, match=r"`data.locales`: unknown source\(s\) 'fra' \(closest: fr"):
        check_data_config(compose("tiny", [f"data.dir={corpus_dir}", "data.locales=[de,fra]"]).data)


def test_corpus_choice_is_checked():
    with pytest.raises(ConfigError, match=r"`data.corpus`: 'hub' not allowed; choose one of gettext, django, folder"):
        compose("tiny", ["data.corpus=hub"])


# ---------------------------------------------------------------------------
# Bad rows: skipped and counted per reason, logged with file and line; strict turns them into errors
# ---------------------------------------------------------------------------

BAD_LINES = {  # line content -> reason
    b"{not json": "malformed",
    b'["a", "list"]': "malformed",
    b'{"query": 7, "passage": "p"}': "malformed",
    b'{"query": "q-missing"}': "missing_field",
    b'{"query": null, "passage": "p"}': "missing_field",
    b'{"query": "   ", "passage": "p"}': "empty_text",
    b'{"query": "q", "passage": "\xff\xfe"}': "undecodable",
    b'{"query": "\\ud800", "passage": "p"}': "undecodable",
    b'{"query": "q-few", "passage": "p-few", "negative_1": "n", "negative_2": ""}': "too_few_negatives",
    json.dumps(records(1, negatives=2)[0]).encode(): "duplicate",  # whichever copy of row 0 comes second
}


def bad_file(tmp_path):
    """30 good rows with 2 negatives, then every bad line; returns the source and {line number: reason}."""
    lines = [json.dumps(row).encode() for row in records(30, negatives=2)] + list(BAD_LINES)
    path = write_jsonl(tmp_path / "bad.jsonl", lines[:30] + [b""] + lines[30:])  # a blank line is no row
    source = open_source(path, negatives_per_row=2)
    return source, {31 + i + 1: reason for i, reason in enumerate(BAD_LINES.values())}


def test_bad_rows_are_skipped_counted_and_logged(tmp_path, caplog):
    source, _ = bad_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger="datamodules.stream"):
        batches, skips = full_pass(source, batch_size=5, pool_batches=8)  # one pool: q0 meets its duplicate
    assert skips == Counter(BAD_LINES.values())
    assert sorted(int(row.query[1:]) for batch in batches for row in batch) == list(range(30))
    logged = [record.getMessage() for record in caplog.records]
    assert len(logged) == 5 and all("bad.jsonl:" in message for message in logged)  # the first few, not duplicates


def test_strict_stops_at_the_first_bad_row_naming_file_and_line(tmp_path):
    source, reasons = bad_file(tmp_path)
    with pytest.raises(DataError, match=r"bad\.jsonl:\d+: \w+ .*data.strict") as error:
        full_pass(source, batch_size=5, strict=True)
    line, reason = re.search(r"bad\.jsonl:(\d+): (\w+)", str(error.value)).groups()
    assert reasons[int(line)] == reason


def test_parquet_undecodable_bytes_and_nulls_are_counted(tmp_path):
    rows = records(20) + [{"query": "q-bad", "passage": b"\xff"}, {"query": None, "passage": b"p"}]
    rows = [{**row, "passage": row["passage"].encode() if isinstance(row["passage"], str) else row["passage"]}
            for row in rows]
    source = open_source(write_parquet(tmp_path / "s.parquet", rows, binary=("passage",)))
    batches, skips = full_pass(source, batch_size=4)
    assert skips == Counter({"undecodable": 1, "missing_field": 1})
    assert sum(map(len, batches)) == 20


def test_make_row_keeps_enough_usable_negatives():
    row = make_row(3, ("q", "p", "n1", None, "", "n4"), 2)
    assert (row.query, row.passage, row.negatives, row.index) == ("q", "p", ("n1", "n4"), 3)
    assert make_row(3, ("q", "p", "n1", None), 2) == "too_few_negatives"


def test_strict_names_the_first_bad_line_of_the_file_not_the_first_one_read(tmp_path):
    lines = [json.dumps(row).encode() for row in records(400)]
    lines[10], lines[80] = b"{not json", b'["a", "list"]'  # lines 11 and 81; blocks are read in shuffled order
    source = open_source(write_jsonl(tmp_path / "s.jsonl", lines))
    with pytest.raises(DataError, match=r"s\.jsonl:11: malformed .*data\.strict is on \(the first unusable row"):
        full_pass(source, batch_size=8, strict=True)  # before: s.jsonl:81


def test_a_parquet_text_column_of_another_type_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"query": [f"q{i}" for i in range(40)], "passage": list(range(40))}), path)
    # before: "fewer than 8 usable rows (skipped {'malformed': 40})" once training started
    with pytest.raises(DataError, match=r"s\.parquet: column 'passage' has type int64; text columns must be string"):
        open_source(path)
