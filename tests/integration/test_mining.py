"""Hard-negative mining (datamodules/mining_pipeline*.py, experiments/mine.py): the recipe's numbers, translation groups,
resume, options, and the DataModule training on the mined folder with k of N negatives."""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from datamodules.mining_pipeline import mine
from datamodules.mining_recipe import RULES, MiningConfig, TextGroups, pool_passages, select_negatives, text_key
from datamodules.sources import DataError, make_row, open_source
from experiments.config import ConfigError, compose
from experiments.mine import Encoder, compose_mining, main
from tests.conftest import run_overrides
from tests.data_helpers import consume, echo, write_jsonl

LOCALES = ["kk", "ta"]  # 655 and 1,612 train pairs, pools capped at 300: about a second with the tiny backbone
TINY_MINING = ["model.max_length=24", "mine.max_queries=40", "mine.max_pool=300", "mine.top_k=20", "mine.skip_top=2",
               "mine.max_score=1.0", "mine.max_ratio=2.0", "mine.keep=6", "mine.min_negatives=3", "mine.batch_size=16",
               "mine.cache_chunk=64", "mine.progress=false"]


def tiny_mining(tmp_path, corpus_dir, mlflow_dir, out, extra=()):
    """The tiny experiment (random-init BERT) on two locales of the session's corpus, mined into ``out``."""
    return compose_mining("tiny", [*run_overrides(tmp_path, corpus_dir, mlflow_dir), f"data.locales=[{','.join(LOCALES)}]",
                                   *TINY_MINING, f"mine.out={out}", *extra])


@pytest.fixture(scope="module")
def mined(tmp_path_factory, corpus_dir, mlflow_dir):
    """One uninterrupted mining run: ``(config, mining options, encoder, report)``."""
    root = tmp_path_factory.mktemp("mined")
    config, mining = tiny_mining(root, corpus_dir, mlflow_dir, root / "out")
    encoder = Encoder(config, mining)
    return config, mining, encoder, mine(config, mining, encoder)


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def negatives_of(row: dict) -> list[str]:
    return [value for key, value in row.items() if key.startswith("negative_") and value is not None]


# ---------------------------------------------------------------------------
# The recipe on hand-built embeddings
# ---------------------------------------------------------------------------

# Pool passages with their cosine to the query (x, y) = (1, 0): a pool vector (s, sqrt(1 - s²)) scores s.
POOL = [("Open file", 0.90),      # 0: the positive
        ("open  FILE!", 0.97),    # 1: the positive's text up to case, spaces and punctuation
        ("Open a file", 0.93),    # 2: another English source of the same German query: the positive's group
        ("Close file", 0.95),     # 3
        ("Save file", 0.87),      # 4
        ("Print file", 0.82),     # 5
        ("Rename file", 0.79),    # 6
        ("Delete file", 0.76),    # 7
        ("Copy file", 0.70),      # 8
        ("Move file", 0.60),      # 9
        ("Quit", 0.10)]           # 10
ROWS = [("Datei öffnen", "Open file"), ("Datei öffnen", "Open a file"), ("Datei schließen", "Close file")]


def hand_built(**options):
    groups = TextGroups(ROWS)
    keys: dict[str, int] = {}
    pool = torch.tensor([[score, math.sqrt(1 - score ** 2)] for _, score in POOL])
    mining = MiningConfig(**{"top_k": 10, "skip_top": 2, "max_score": 0.8, "max_ratio": 0.85, "keep": 2, **options})
    return select_negatives(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), pool,
                            torch.tensor([keys.setdefault(text_key(text), len(keys)) for text, _ in POOL]),
                            torch.tensor([groups.group(text) for text, _ in POOL]), mining)


def test_recipe_keeps_and_removes_the_hand_computed_candidates():
    # top 10 by score: 1 (.97), 3 (.95), 2 (.93), 0 (.90), 4 (.87), 5 (.82), 6 (.79), 7 (.76), 8 (.70), 9 (.60).
    # 1 and 0: positive; 2: same group; 3: rank 1 < skip_top 2; 4, 5: >= max_score .8; 6: >= .85 × .90 = .765;
    # 7, 8 kept; 9: beyond keep 2; 10 is not among the top 10.
    selection = hand_built()
    assert selection.negatives == [[7, 8]]
    np.testing.assert_allclose(selection.scores, [[0.76, 0.70]], atol=1e-6)
    np.testing.assert_allclose(selection.positive_scores, [0.90], atol=1e-6)
    assert selection.candidates == 10
    assert dict(selection.removed) == {"positive": 2, "same_group": 1, "skip_top": 1, "max_score": 2,
                                       "max_ratio": 1, "keep": 1}
    assert sum(selection.removed.values()) + 2 == selection.candidates


def test_each_threshold_moves_the_hand_computed_candidates():
    assert hand_built(max_ratio=0.9).negatives == [[6, 7]]   # .9 × .9 = .81: 6 (.79) passes now
    assert hand_built(max_score=0.85).negatives == [[7, 8]]  # 5 (.82) passes max_score, not max_ratio (.765)
    assert hand_built(max_score=0.85, max_ratio=1.0).negatives == [[5, 6]]  # 4 (.87) >= .85; .9 × 1 = .9
    assert hand_built(keep=5).negatives == [[7, 8, 9]]        # only three survive the score rules
    loose = hand_built(skip_top=0, max_score=1.0, max_ratio=2.0, keep=8)
    assert loose.negatives == [[3, 4, 5, 6, 7, 8, 9]]           # the positive, its copy and group never, whatever the rest
    assert dict(loose.removed) == dict.fromkeys(RULES, 0) | {"positive": 2, "same_group": 1}
    assert hand_built(top_k=11, skip_top=0, max_score=1.0, max_ratio=2.0, keep=20).candidates == 11


def test_text_key_ignores_case_spacing_and_punctuation_but_keeps_marks():
    assert text_key("Open  FILE!") == text_key("open file") == text_key("«Open file.»") == "openfile"
    assert text_key("कि") != text_key("क")  # a Devanagari vowel sign is a combining mark: a different word
    assert text_key("...") == "..." and text_key("…") != text_key("?")  # punctuation-only texts stay themselves


def test_groups_join_rows_through_shared_query_or_passage_texts():
    groups = TextGroups([("a", "x"), ("b", "x."), ("b", "y"), ("c", "z")])
    assert len({groups.group(text) for text in ("a", "b", "X", "y")}) == 1  # a-x, x-b (x. = x), b-y
    assert groups.group("c") == groups.group("z") != groups.group("a")
    assert groups.group("unseen") not in {groups.group("a"), groups.group("c")}


def test_a_capped_pool_keeps_the_positives_and_the_same_other_texts_in_every_source():
    english = [f"English sentence {i}" for i in range(60)]
    de, fr = [(f"de {i}", text) for i, text in enumerate(english)], [(f"fr {i}", text) for i, text in enumerate(english)]
    de_rows, fr_rows = de[:10], fr[30:40]
    assert pool_passages(de, de_rows, None, seed=0) == sorted(english) == pool_passages(de, de_rows, 60, seed=0)
    de_pool, fr_pool = set(pool_passages(de, de_rows, 25, seed=0)), set(pool_passages(fr, fr_rows, 25, seed=0))
    positives = {text for _, text in de_rows + fr_rows}
    assert len(de_pool) == len(fr_pool) == 25 and {t for _, t in de_rows} <= de_pool and {t for _, t in fr_rows} <= fr_pool
    # 15 others each, the first of one hash order: besides both sources' positives, one pick contains the other
    de_others, fr_others = de_pool - positives, fr_pool - positives
    assert (de_others <= fr_others or fr_others <= de_others) and len(de_pool | fr_pool) <= 10 + 10 + 15
    assert set(pool_passages(fr, fr_rows, 25, seed=1)) != fr_pool  # the seed picks other texts
    assert pool_passages(de, de_rows, 4, seed=0) == sorted(t for _, t in de_rows)  # never fewer than the positives


# ---------------------------------------------------------------------------
# Translation pairs end to end: never the positive, never its translation
# ---------------------------------------------------------------------------


def meaning_encoder(meanings: dict[str, str]):
    """A stand-in encoder: a text scores ~0.99 with every text of the same meaning, little with the others."""
    def vector(text: str, scale: float) -> np.ndarray:
        return np.random.default_rng(zlib.crc32(text.encode())).normal(size=32) * scale

    def encode(texts, role):
        rows = np.stack([vector(meanings.get(text, text), 1.0) + vector(text, 0.1) for text in texts])
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    return encode


def test_other_translations_and_copies_of_the_positive_are_never_negatives(tmp_path):
    # English queries (en2xx-style folder source): "Open the file" has two German translations, and "Open a file"
    # one that is a copy of the first up to punctuation. Every row's own texts share a meaning (score ~0.99).
    opening = [("Open the file", "Datei öffnen"), ("Open the file", "Öffne die Datei"), ("Open a file", "Datei öffnen.")]
    rows = [*opening, *[(f"English sentence {i}", f"Deutscher Satz {i}") for i in range(12)]]
    meanings = {text: "open" for row in opening for text in row}
    meanings |= {text: f"s{i}" for i in range(12) for text in (f"English sentence {i}", f"Deutscher Satz {i}")}
    write_jsonl(tmp_path / "data" / "de.jsonl", [{"query": q, "passage": p} for q, p in rows])
    config, mining = compose_mining("tiny", ["data.corpus=folder", f"data.dir={tmp_path / 'data'}",
                                             f"mine.out={tmp_path / 'out'}", "mine.top_k=10", "mine.skip_top=0",
                                             "mine.max_score=1.0", "mine.max_ratio=2.0", "mine.keep=5",
                                             "mine.min_negatives=1", "mine.progress=false"])
    report = mine(config, mining, meaning_encoder(meanings))
    open_texts = {text_key(text) for text in ("Datei öffnen", "Öffne die Datei")}
    written = read_rows(tmp_path / "out" / "de.jsonl")
    assert len(written) == len(rows)
    for row in written:
        assert row["passage"] not in negatives_of(row) and len(negatives_of(row)) == 5
        if (row["query"], row["passage"]) in opening:  # no German "open the file" at all
            assert not open_texts & {text_key(negative) for negative in negatives_of(row)}, row
    # The three "open" texts top each "open" row: "Datei öffnen" and "Datei öffnen." are one text (positive), the
    # third a translation (same_group): 2 + 1, 1 + 2 and 2 + 1. Each other row finds its own positive only.
    removed = report["sources"]["de"]["removed"]
    assert removed == dict.fromkeys(RULES, 0) | {"positive": 5 + 12, "same_group": 4, "keep": 15 * (10 - 5) - 21}


def test_rows_below_min_negatives_are_left_out_and_the_loader_reads_the_rest(tmp_path):
    rows = [(f"English sentence {i}", f"Deutscher Satz {i}") for i in range(40)]
    write_jsonl(tmp_path / "data" / "de.jsonl", [{"query": q, "passage": p} for q, p in rows])
    config, mining = compose_mining("tiny", ["data.corpus=folder", f"data.dir={tmp_path / 'data'}",
                                             f"mine.out={tmp_path / 'out'}", "mine.top_k=20", "mine.skip_top=0",
                                             "mine.max_score=0.1", "mine.keep=8", "mine.min_negatives=3",
                                             "mine.progress=false"])
    # Unrelated random 32-d texts: about a third score >= 0.1, so rows keep between 0 and 8 negatives.
    stats = mine(config, mining, meaning_encoder({}))["sources"]["de"]
    histogram = {int(count): rows for count, rows in stats["negatives_per_row"].items()}
    assert sum(rows for count, rows in histogram.items() if count < 3) == stats["rows_too_few_negatives"] > 0
    assert sum(rows for count, rows in histogram.items() if count >= 3) == stats["rows_written"] > 0
    source = open_source(tmp_path / "out" / "de.jsonl", negatives_per_row=3)
    assert source.num_negative_fields == 8  # every row has every field, null where fewer survived
    read = [make_row(index, values, 3) for start, stop, locator in source.blocks
            for index, values in source.read(int(start), int(stop), int(locator))]
    assert sorted(len(row.negatives) for row in read) == sorted(
        count for count, rows in histogram.items() if count >= 3 for _ in range(rows))


# ---------------------------------------------------------------------------
# The real path: tiny backbone, built corpus, resume
# ---------------------------------------------------------------------------


def test_mined_folder_has_the_paper_layout_and_a_report(mined):
    _, mining, _, report = mined
    out = Path(mining.out)
    assert yaml.safe_load((out / "sources.yaml").read_text()) == {
        locale: {"task": "retrieval", "language": locale} for locale in LOCALES}
    for locale in LOCALES:
        stats = report["sources"][locale]
        rows = read_rows(out / f"{locale}.jsonl")
        assert len(rows) == stats["rows_written"] == stats["queries"] - stats["rows_too_few_negatives"]
        assert stats["queries"] == 40 and stats["candidates"] == 40 * 20
        kept = sum(int(count) * rows for count, rows in stats["negatives_per_row"].items())
        assert sum(stats["removed"].values()) + kept == stats["candidates"]  # every candidate kept or removed once
        assert all(list(row) == ["query", "passage", *(f"negative_{j}" for j in range(1, 7))] for row in rows)
        assert all(3 <= len(negatives_of(row)) <= 6 and row["passage"] not in negatives_of(row) for row in rows)
    text = (out / "report.md").read_text()
    assert "| kk | 40 | 300 | 20.0 |" in text and "**kk** query:" in text and "positive (" in text


def test_resume_after_an_interruption_gives_identical_output(mined, tmp_path, corpus_dir, mlflow_dir):
    _, reference, encoder, report = mined
    config, mining = tiny_mining(tmp_path, corpus_dir, mlflow_dir, tmp_path / "out")
    calls = []

    def killed_after(limit):
        def encode(texts, role):
            calls.append(len(texts))
            if len(calls) > limit:
                raise KeyboardInterrupt
            return encoder(texts, role)
        return encode

    # kk: 300 passages in chunks of 64 = 4 + 4 + 4 + 4 + 3 batches of 16, 40 queries = 3; then 2 chunks of ta's
    # passages (8 batches) are saved before the kill
    with pytest.raises(KeyboardInterrupt):
        mine(config, mining, killed_after(22 + 8))
    kk_file = tmp_path / "out" / "kk.jsonl"
    assert kk_file.is_file() and not (tmp_path / "out" / "ta.jsonl").exists()
    kk_written, calls[:] = kk_file.stat().st_mtime_ns, []
    resumed = mine(config, mining, killed_after(10**6))
    for name in ("kk.jsonl", "ta.jsonl", "sources.yaml"):
        assert (tmp_path / "out" / name).read_bytes() == (Path(reference.out) / name).read_bytes(), name
    # kk was not mined again; two chunks of ta's passages (2 × 64) came from the killed run's cache
    assert kk_file.stat().st_mtime_ns == kk_written
    assert sum(calls) == resumed["sources"]["ta"]["texts_encoded"] == report["sources"]["ta"]["texts_encoded"] - 128
    calls.clear()
    again = mine(config, mining, killed_after(0))  # everything done: nothing encoded, nothing rewritten
    assert not calls and again["sources"] == resumed["sources"]


def test_changed_settings_mine_again_from_the_cached_encodings(mined, tmp_path, corpus_dir, mlflow_dir):
    reference = mined[1]
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    config, mining = tiny_mining(tmp_path, corpus_dir, mlflow_dir, out, ["mine.keep=4"])

    def no_encoding(texts, role):
        raise AssertionError("the encodings are cached")

    report = mine(config, mining, no_encoding)
    assert all(len(read_rows(out / f"{locale}.jsonl")[0]) == 2 + 4 for locale in LOCALES)
    assert report["sources"]["kk"]["texts_encoded"] == 0


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "key", "message"), [
    (["mine.top_k=0"], "mine.top_k", "must be >= 1"),
    (["mine.skip_top=100"], "mine.skip_top", "must be in [0, mine.top_k) = [0, 100)"),
    (["mine.keep=96"], "mine.keep", "must be in [1, mine.top_k - mine.skip_top] = [1, 95]"),
    (["mine.keep=4"], "mine.min_negatives", "7 not allowed: must be in [0, mine.keep] = [0, 4]"),
    (["mine.max_score=1.5"], "mine.max_score", "must be a cosine in [-1, 1]"),
    (["mine.max_ratio=0"], "mine.max_ratio", "must be > 0"),
    (["mine.max_queries=0"], "mine.max_queries", "must be >= 1"),
    (["mine.max_pool=0"], "mine.max_pool", "must be >= 1"),
    (["mine.model=/no/such.ckpt"], "mine.model", "or a checkpoint file"),
    (["mine.top=5"], "mine.top", "unknown key; allowed keys here: model, out, top_k"),
    (["mine.top_k=many"], "mine.top_k", "Value 'many' of type 'str' could not be converted to Integer"),
    (["data.direction=both"], "data.direction", "choose xx2en or en2xx"),
])
def test_bad_options_stop_with_one_line_naming_the_key(args, key, message):
    with pytest.raises(ConfigError) as error:
        compose_mining("tiny", args)
    assert error.value.key == key and message in str(error.value) and "\n" not in str(error.value)


def test_command_line_reports_a_bad_option_on_one_line(capsys):
    assert main(["tiny", "mine.keep=0"]) == 2
    assert capsys.readouterr().err.strip() == ("config error at `mine.keep`: 0 not allowed: must be in "
                                               "[1, mine.top_k - mine.skip_top] = [1, 95]")
    assert main([]) == 2 and "mine.key=value" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# Training on the mined folder
# ---------------------------------------------------------------------------


def test_datamodule_draws_k_of_n_mined_negatives_and_the_same_batches_without_them(mined):
    from datamodules.pairs import TranslationPairsDataModule

    out = Path(mined[1].out)
    mined_negatives = {(row["query"], row["passage"]): set(negatives_of(row))
                       for locale in LOCALES for row in read_rows(out / f"{locale}.jsonl")}

    def batches(k):
        data = compose("tiny", ["data.corpus=folder", f"data.dir={out}", "data.batch_size=4",
                                f"data.negatives.retrieval={k}"]).data
        datamodule = TranslationPairsDataModule(data, echo, seed=0)
        datamodule.setup("fit")
        return consume(datamodule, 24), datamodule

    with_negatives, datamodule = batches(3)
    assert {name: source.num_negative_fields for name, source in datamodule.sources.items()} == dict.fromkeys(LOCALES, 6)
    for _, _, queries, passages, negatives in with_negatives:
        for query, passage, drawn in zip(queries, passages, negatives):
            assert len(set(drawn)) == 3 and set(drawn) <= mined_negatives[(query, passage)]
    assert not any(datamodule.skipped.get(name, {}).get("too_few_negatives") for name in LOCALES)
    without, _ = batches(0)
    assert [batch[:4] for batch in without] == [batch[:4] for batch in with_negatives]
    assert all(batch[4] is None for batch in without)


@pytest.mark.slow
def test_a_training_checkpoint_mines_at_its_full_cell(tmp_path, corpus_dir, mlflow_dir):
    from experiments.run import train

    checkpoint = train(compose("tiny", [*run_overrides(tmp_path, corpus_dir, mlflow_dir), "trainer.max_steps=2"])).checkpoint
    config, mining = tiny_mining(tmp_path, corpus_dir, mlflow_dir, tmp_path / "out", [f"mine.model={checkpoint}"])
    assert Encoder(config, mining).cell.name == "layer_4/dim_32/rank_16"  # 4 blocks, hidden 32, the largest rank
    report = mine(config, mining, Encoder(config, mining))
    assert report["model"] == str(checkpoint) and report["sources"]["kk"]["rows_written"] > 0


def test_an_output_folder_that_is_an_input_or_holds_other_files_is_refused(tmp_path, capsys):
    rows = [{"query": f"English sentence {i}", "passage": f"Deutscher Satz {i}"} for i in range(40)]
    write_jsonl(tmp_path / "data" / "s.jsonl", rows)
    source_bytes = (tmp_path / "data" / "s.jsonl").read_bytes()
    options = ["data.corpus=folder", f"data.dir={tmp_path / 'data'}", "mine.top_k=20", "mine.skip_top=0",
               "mine.max_score=1.0", "mine.keep=4", "mine.min_negatives=1", "mine.progress=false"]
    config, mining = compose_mining("tiny", [*options, f"mine.out={tmp_path / 'data'}"])
    with pytest.raises(DataError, match=r"holds the sources being mined") as error:
        mine(config, mining, meaning_encoder({}))  # before: 40 source rows replaced by the mined ones, exit 0
    assert error.value.key == "mine.out"
    assert main(["tiny", *options, f"mine.out={tmp_path / 'data'}"]) == 2  # the command: one line naming the key
    assert capsys.readouterr().err.strip() == (f"config error at `mine.out`: {tmp_path / 'data'} holds the sources "
                                               f"being mined; choose another folder (default: data/mined/<NAME>)")
    assert (tmp_path / "data" / "s.jsonl").read_bytes() == source_bytes

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "s.jsonl").write_text("a file of the user's\n")
    config, mining = compose_mining("tiny", [*options, f"mine.out={tmp_path / 'out'}"])
    with pytest.raises(DataError, match=r"did not write \(s.jsonl\).*mine.overwrite=true") as error:
        mine(config, mining, meaning_encoder({}))
    assert error.value.key == "mine.out"
    assert (tmp_path / "out" / "s.jsonl").read_text() == "a file of the user's\n"
    config, mining = compose_mining("tiny", [*options, f"mine.out={tmp_path / 'out'}", "mine.overwrite=true"])
    mine(config, mining, meaning_encoder({}))
    assert read_rows(tmp_path / "out" / "s.jsonl")[0]["passage"].startswith("Deutscher Satz")
    config, mining = compose_mining("tiny", [*options, f"mine.out={tmp_path / 'out'}"])
    mine(config, mining, meaning_encoder({}))  # its own files since: mined again without the option
    assert not list((tmp_path / "out").glob(".*tmp-*"))  # every write went through a rename
