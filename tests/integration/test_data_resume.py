"""Exact resume: after N steps, a save and a resume, the next N batches equal those of a straight run of 2N."""

from __future__ import annotations

import io

import pytest
import torch

from datamodules.pairs import TranslationPairsDataModule
from datamodules.sources import open_source
from datamodules.stream import SourceStream, StreamOptions
from experiments.run import train
from lightning_modules.module import MatryoshkaEmbedder
from tests.data_helpers import consume, echo, folder_config, records, write_jsonl


def checkpoint_roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_resume_repeats_the_straight_batch_sequence(tmp_path, num_workers):
    config = folder_config(tmp_path, [f"data.num_workers={num_workers}"])
    straight = TranslationPairsDataModule(config, echo, seed=1)
    straight.setup("fit")
    expected = consume(straight, 30)

    first = TranslationPairsDataModule(config, echo, seed=1)
    first.setup("fit")
    seen = consume(first, 15)
    resumed = TranslationPairsDataModule(config, echo, seed=1)
    resumed.setup("fit")
    resumed.load_state_dict(checkpoint_roundtrip(first.state_dict()))
    seen += consume(resumed, 15)

    assert seen == expected
    assert {source for _, source, *_ in expected} == {"web", "wiki"}
    assert resumed.examples == straight.examples and resumed.skipped == straight.skipped
    assert straight.skipped["web"]["empty_text"] + straight.skipped["web"]["missing_field"] > 0


def test_a_pool_rebuilt_mid_way_neither_repeats_rows_nor_recounts_skips(tmp_path):
    rows = [row if i % 5 else {"query": " ", "passage": row["passage"]} for i, row in enumerate(records(200))]
    source = open_source(write_jsonl(tmp_path / "s.jsonl", rows))
    options = StreamOptions(batch_size=4, pool_batches=4)
    straight = SourceStream(source, 0, 1, options)
    expected = [straight.next_batch() for _ in range(10)]
    first = SourceStream(source, 0, 1, options)
    seen = [first.next_batch() for _ in range(6)]
    assert seen[-1][2][3] == 2  # the resume point lies inside the second pool
    resumed = SourceStream(source, 0, 1, options, position=seen[-1][2])
    seen += [resumed.next_batch() for _ in range(4)]
    assert seen == expected  # rows, positions, and skip counts reported with each batch
    assert expected[4][1]["empty_text"] > 0 and not seen[6][1]  # the second pool reports its skips once


def test_resume_refuses_a_different_worker_layout_and_an_old_state(tmp_path):
    datamodule = TranslationPairsDataModule(folder_config(tmp_path), echo, seed=1)
    datamodule.setup("fit")
    state = datamodule.state_dict()
    other = TranslationPairsDataModule(folder_config(tmp_path, ["data.num_workers=2"]), echo, seed=1)
    other.setup("fit")
    with pytest.raises(ValueError, match=r"1 device\(s\) × 1 data worker\(s\); resume with the same"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="older version of the DataModule.*resume=false"):
        datamodule.load_state_dict({"next_batch": 6, "seed": 0, "locales": ["de"]})


def test_lightning_resume_sees_the_batches_of_a_straight_run(tiny_config, tmp_path, monkeypatch):
    """Train 3 steps, save, resume to 6 (2 loader workers, bucketing): the 6 batches equal a straight 6-step run."""
    seen: list[tuple] = []
    original_step = MatryoshkaEmbedder.training_step

    def recording_step(self, batch, batch_idx):
        seen.append((self.global_step, batch["batch_index"], batch["source"], batch["input_ids"].tolist()))
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(MatryoshkaEmbedder, "training_step", recording_step)
    overrides = ["data.locales=[de,fr]", "data.num_workers=2", "data.bucketing=true", "data.pool_batches=4"]
    straight = train(tiny_config("tiny", [*overrides, "trainer.max_steps=6", f"output_dir={tmp_path}/straight"]))
    expected, seen[:] = list(seen), []
    train(tiny_config("tiny", [*overrides, "trainer.max_steps=3"]))
    resumed = train(tiny_config("tiny", [*overrides, "trainer.max_steps=6"]))  # continues the 3-step run

    assert [step for step, *_ in seen] == list(range(6)) and seen == expected
    state = torch.load(resumed.checkpoint, weights_only=False)["TranslationPairsDataModule"]
    assert state["next_batch"] == 6 and sum(state["examples"].values()) == 6 * 8
    assert {"run/data/device/padding_fraction", "run/data/device/wait_s", "run/data/device/wait_fraction",
            "run/data/examples/de"} <= set(straight.metrics)
    assert straight.metrics["run/data/examples/de"] + straight.metrics["run/data/examples/fr"] == 6 * 8


def test_counts_per_source_and_language_as_metric_names(tmp_path):
    data = tmp_path / "languages"
    for name in ("wiki_de", "news_de", "sr@latin", "ü:x"):
        write_jsonl(data / f"{name}.jsonl", records(40, tag=name))
    (data / "sources.yaml").write_text(
        "wiki_de: {language: de}\nnews_de: {language: de}\nsr@latin: {language: sr}\n'ü:x': {language: x}\n")
    config = folder_config(tmp_path, ["data.batch_size=2", f"data.dir={data}", "data.bucketing=false"])
    datamodule = TranslationPairsDataModule(config, echo, seed=0)
    datamodule.setup("fit")
    batches = consume(datamodule, 25)
    per_source = {name: 2 * sum(source == name for _, source, *_ in batches) for name in datamodule.sources}
    counts = datamodule.counts()
    examples, languages = "run/data/examples", "run/data/examples_language"
    assert counts == {f"{examples}/wiki_de": per_source["wiki_de"], f"{examples}/news_de": per_source["news_de"],
                      f"{examples}/sr_latin": per_source["sr@latin"],  # MLflow forbids '@' in metric names
                      f"{examples}/__x": per_source["ü:x"], f"{languages}/x": per_source["ü:x"],
                      f"{languages}/de": per_source["wiki_de"] + per_source["news_de"],
                      f"{languages}/sr": per_source["sr@latin"]}
