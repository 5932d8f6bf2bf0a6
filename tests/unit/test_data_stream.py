"""The batch stream: sampling ∝ size^α, caps, sharding over 2 ranks × 2 workers, hard negatives, tasks, bucketing."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from datamodules.gettext_corpus import load_split
from datamodules.sources import corpus_sources, open_source
from datamodules.stream import PairBatches, SourceSampler, SourceStream, StreamOptions
from tests.data_helpers import echo, records, row_id, write_jsonl, write_parquet


def take(dataset, count, num_workers=0):
    """The first ``count`` batches of a PairBatches, through a real DataLoader."""
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return list(itertools.islice(loader, count))


# ---------------------------------------------------------------------------
# Source sampling
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("alpha", "expected"), [
    (1.0, [1 / 21, 4 / 21, 16 / 21]),  # ∝ size: 100, 400, 1600
    (0.5, [1 / 7, 2 / 7, 4 / 7]),      # ∝ sqrt(size): 10, 20, 40
    (0.0, [1 / 3, 1 / 3, 1 / 3]),
])
def test_sampling_frequencies_follow_size_to_the_alpha(alpha, expected):
    sampler = SourceSampler([100, 400, 1600], alpha, seed=3)
    np.testing.assert_allclose(sampler.probabilities, expected)
    draws = 20_000
    counts = np.bincount([sampler(t) for t in range(draws)], minlength=3)
    sigma = np.sqrt(draws * np.array(expected) * (1 - np.array(expected)))
    assert (np.abs(counts - draws * np.array(expected)) < 4 * sigma).all(), counts


def test_choice_sequence_is_a_pure_function_of_seed_and_index():
    device_0, device_1 = SourceSampler([5, 7, 9], 1.0, seed=11), SourceSampler([5, 7, 9], 1.0, seed=11)
    forward = [device_0(t) for t in range(5000)]
    assert [device_1(t) for t in reversed(range(5000))] == forward[::-1]  # any order, any process
    assert [SourceSampler([5, 7, 9], 1.0, seed=12)(t) for t in range(5000)] != forward


def test_cap_limits_rows_per_pass_and_sampling_size(tmp_path):
    source = open_source(write_jsonl(tmp_path / "big.jsonl", records(300)), cap=100)
    assert source.size == 100
    stream = SourceStream(source, 0, 1, StreamOptions(10, pool_batches=3))
    passes: list[set] = [set(), set()]
    while stream.position[0] < 2:
        pass_ = stream.position[0]
        rows, _, _ = stream.next_batch()
        passes[pass_].update(row.query for row in rows)
    assert len(passes[0]) == len(passes[1]) == 100 and passes[0] != passes[1]  # a fresh random 100 per pass


# ---------------------------------------------------------------------------
# Sharding: 2 simulated ranks × 2 DataLoader workers
# ---------------------------------------------------------------------------


def test_two_ranks_two_workers_cover_a_pass_without_duplicates_or_gaps(tmp_path):
    # 256 rows: 64 blocks of 4; 512 rows: 8 row groups of 8 blocks of 8. Each of the 4 shards gets a quarter.
    source = open_source(write_jsonl(tmp_path / "s.jsonl", records(256)))
    other = open_source(write_parquet(tmp_path / "t.parquet", records(512, tag="t"), row_group_size=64))
    options = StreamOptions(batch_size=8, pool_batches=2, seed=5)
    per_rank = [take(PairBatches([source, other], echo, options, alpha=1.0, rank=rank, world_size=2, num_workers=2),
                     90, num_workers=2) for rank in range(2)]

    assert [b["source"] for b in per_rank[0]] == [b["source"] for b in per_rank[1]]  # same source on every device
    assert [b["batch_index"] for b in per_rank[0]] == list(range(90))
    for name, rows in (("s", 256), ("t", 512)):
        # Positions after a batch: [pass, block, row, emitted]; the pass's last batch leaves [1, 0, 0, 0].
        first_pass = [b for batches in per_rank for b in batches if b["source"] == name and
                      (b["data_state"]["position"][0] == 0 or b["data_state"]["position"] == [1, 0, 0, 0])]
        queries = [query for b in first_pass for query in b["queries"]]
        assert len(queries) == len(set(queries)) == rows  # every row once: no duplicates, no gaps
    workers = {(b["batch_index"] % 2, b["data_state"]["worker"]) for b in per_rank[0]}
    assert workers == {(0, 0), (1, 1)}


def test_shards_are_disjoint_and_differ_per_pass(tmp_path):
    source = open_source(write_jsonl(tmp_path / "s.jsonl", records(512)))
    options = StreamOptions(batch_size=4, pool_batches=4)
    seen = []
    for shard in range(4):
        stream = SourceStream(source, shard, 4, options)
        seen.append({row.query for _ in range(32) for row in stream.next_batch()[0]})  # 128 rows: a whole pass
        assert stream.position[0] == 1
    assert sum(map(len, seen)) == 512 and len(set.union(*seen)) == 512
    again = {row.query for _ in range(32) for row in stream.next_batch()[0]}  # shard 3, second pass
    assert len(again) == 128 and again != seen[3]  # each pass deals the blocks anew


def test_workers_follow_the_batch_index_after_a_resume(tmp_path):
    """A DataLoader restarts at worker 0; batch t must still come from logical worker t mod W."""
    source = open_source(write_jsonl(tmp_path / "s.jsonl", records(400)))
    options = StreamOptions(batch_size=4, pool_batches=2)
    straight = take(PairBatches([source], echo, options, 1.0, num_workers=2), 12, num_workers=2)
    positions = {b["data_state"]["worker"]: {"s": b["data_state"]["position"]} for b in straight[:5]}
    resumed = take(PairBatches([source], echo, options, 1.0, num_workers=2, start_batch=5, positions=positions),
                   7, num_workers=2)
    assert [b["queries"] for b in resumed] == [b["queries"] for b in straight[5:]]


# ---------------------------------------------------------------------------
# Hard negatives, tasks, direction, bucketing
# ---------------------------------------------------------------------------


def test_k_of_n_hard_negatives_are_sampled_from_the_row_itself(tmp_path):
    source = open_source(write_parquet(tmp_path / "s.parquet", records(400, negatives=24)), negatives_per_row=7)
    batches = take(PairBatches([source], echo, StreamOptions(batch_size=8), 1.0), 40)
    column_counts = Counter()
    for batch in batches:
        assert batch["negatives_per_query"] == 7 and batch["in_batch"] is True
        for query, negatives in zip(batch["queries"], batch["negatives"]):
            assert len(set(negatives)) == 7 and {row_id(n) for n in negatives} == {row_id(query)}
            column_counts.update(int(n.split("_")[1]) for n in negatives)
    assert set(column_counts) == set(range(1, 25))
    expected = 40 * 8 * 7 / 24  # uniform over the 24 columns
    assert all(abs(count - expected) < 5 * np.sqrt(expected) for count in column_counts.values())


def test_tasks_set_the_in_batch_flag_and_sources_without_negatives_use_in_batch_only(tmp_path):
    clustering = open_source(write_jsonl(tmp_path / "c.jsonl", records(64, negatives=9, tag="c")),
                             task="clustering", negatives_per_row=9)
    plain = open_source(write_jsonl(tmp_path / "r.jsonl", records(64, tag="r")))
    batches = take(PairBatches([clustering, plain], echo, StreamOptions(batch_size=4), 1.0), 30)
    by_source = {b["source"]: b for b in batches}
    assert by_source["c"]["in_batch"] is False and by_source["c"]["negatives_per_query"] == 9
    assert by_source["r"]["in_batch"] is True and by_source["r"]["negatives"] is None


def test_both_directions_swap_query_and_passage_in_about_half_the_batches(corpus_dir):
    source = corpus_sources(corpus_dir, ["de"], "both")["de"]
    english = {pair.en for pair in load_split(corpus_dir, "train", "de")}
    batches = take(PairBatches([source], echo, StreamOptions(batch_size=4), 1.0), 200)
    english_passages = [all(text in english for text in b["passages"]) for b in batches]
    english_queries = [all(text in english for text in b["queries"]) for b in batches]
    assert all(p != q for p, q in zip(english_passages, english_queries))
    assert 70 < sum(english_passages) < 130


def test_bucketing_sorts_a_pool_by_length_and_keeps_its_rows(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"query": f"q{i} " + "x" * int(rng.integers(1, 200)), "passage": f"p{i}"} for i in range(320)]
    source = open_source(write_jsonl(tmp_path / "s.jsonl", rows))
    pools = {}
    for bucketing in (False, True):
        stream = SourceStream(source, 0, 1, StreamOptions(batch_size=8, pool_batches=10, bucketing=bucketing))
        pools[bucketing] = [stream.next_batch()[0] for _ in range(10)]  # exactly the first pool
    assert sorted(r.query for b in pools[True] for r in b) == sorted(r.query for b in pools[False] for r in b)
    spans = sorted((min(len(r.query) for r in b), max(len(r.query) for r in b)) for b in pools[True])
    assert all(high <= next_low for (_, high), (next_low, _) in zip(spans, spans[1:]))  # no overlapping lengths
    width = {key: np.mean([max(len(r.query) for r in b) for b in batches]) for key, batches in pools.items()}
    assert width[True] < 0.8 * width[False]


def test_padding_fraction_is_reported_per_batch(tmp_path):
    from datamodules.tokenization import BatchTokenizer
    from lightning_modules.backbones.tiny import byte_tokenizer

    rows = [{"query": "a" * (1 + i % 40), "passage": "b" * (1 + (7 * i) % 40)} for i in range(256)]
    source = open_source(write_jsonl(tmp_path / "s.jsonl", rows))
    tokenize = BatchTokenizer(byte_tokenizer(), "encoder", 64)
    for bucketing in (False, True):
        for batch in take(PairBatches([source], tokenize, StreamOptions(8, bucketing=bucketing), 1.0), 4):
            mask = batch["attention_mask"]
            assert batch["padding_fraction"] == pytest.approx(1 - mask.sum().item() / mask.numel())


def test_bench_data_counts_pairs_per_batch_and_padding(tmp_path, corpus_dir, mlflow_dir):
    from bench.data import loader_speed
    from experiments.config import compose
    from tests.conftest import run_overrides

    config = compose("tiny", [*run_overrides(tmp_path, corpus_dir, mlflow_dir), "data.num_workers=0",
                              "data.packing=false"])
    speed = loader_speed(config, batches=3)
    assert speed["pairs_per_s"] == pytest.approx(speed["batches_per_s"] * config.data.batch_size)
    assert 0.0 < speed["padding"] < 1.0  # padded batches of texts of different lengths


@pytest.mark.parametrize("packing, shown", [("true", "on"), ("false", "off")])
def test_bench_data_says_whether_batches_are_packed(tmp_path, corpus_dir, mlflow_dir, capsys, packing, shown):
    """Before: the bucketing table did not say packing was on, where bucketing adds padding instead of removing it."""
    from bench.data import main
    from tests.conftest import run_overrides

    main(["tiny", *run_overrides(tmp_path, corpus_dir, mlflow_dir), f"data.packing={packing}", "--steps", "0",
          "--batches", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["packing", "bucketing", "batches/s", "pairs/s", "padding"]
    assert [line.split()[:2] for line in lines[2:4]] == [[shown, "false"], [shown, "true"]]
    assert any("data.packing=false" in line for line in lines[4:]) == (packing == "true")
