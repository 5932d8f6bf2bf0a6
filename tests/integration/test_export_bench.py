"""``make bench`` runs end to end at tiny sizes and reports what it compared (no timing claims here)."""

import json

import pytest

from bench.__main__ import main

TINY = ["--experiment", "tiny", "--steps", "1", "--batch-size", "8", "--max-length", "32", "--probe-texts", "8",
        "--throughput-texts", "8", "--throughput-repeats", "1", "--mel-vocab", "300", "--mel-rank", "16",
        "--mel-dim", "32", "--mel-tokens", "64", "--mel-repeats", "1"]


def run_bench(items: str, corpus_dir, tmp_path, capsys) -> tuple[dict, str]:
    out = tmp_path / "latest.json"
    assert main([*TINY, "--items", items, "--corpus", str(corpus_dir), "--out", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_bench_items_1_to_5_at_tiny_sizes(corpus_dir, tmp_path, capsys):
    report, printed = run_bench("1,2,3,4,5", corpus_dir, tmp_path, capsys)
    rows = {row["item"] + row["name"]: row for row in report["rows"]}
    assert [row["item"] for row in report["rows"]] == ["1", "1b", "2", "3", "4", "4", "5"]
    for row in report["rows"]:
        assert f"| {row['item']} | {row['name']} | {row['ratio']:.2f} |" in printed
    step = rows["13D-ML step / plain step"]["raw"]["seconds"]
    assert rows["13D-ML step / plain step"]["ratio"] == round(step["3d-ml"] / step["plain"], 3)
    mel = next(row for row in report["rows"] if row["item"] == "2")["raw"]
    assert mel["gradients_agree"] is True
    grid = next(row for row in report["rows"] if row["item"] == "3")["raw"]
    # tiny: exits {1, 2, 4} × dims {32, 16, 8} × ranks {16, 8}; the one-pass-per-rank embeddings are the naive ones.
    assert grid["cells"] == 18 and grid["encodes"] == {"per_setting": 2, "per_cell": 18}
    assert grid["max_difference"] == 0.0
    goals = [row["goal"] for row in report["rows"] if row["item"] == "4"]
    assert goals == ["≥ 3.20 (0.8·L/l)", "≥ 1.60 (0.8·L/l)"]  # 0.8·L/l for L = 4, l = 1 and 2
    assert report["machine"]["cores"] >= 1 and "load_average_1min" in report


def test_bench_rejects_unknown_items(tmp_path, capsys):
    assert main(["--items", "99", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown item(s) ['99']" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_memory_item_at_tiny_size(corpus_dir, tmp_path, capsys):
    report, _ = run_bench("6", corpus_dir, tmp_path, capsys)
    memory, parameters = report["rows"]
    measured = memory["raw"]["measured"]
    # tiny: vocab 260, hidden 32, MEL rank 16 -> embedding 260·32 = 8320 vs 16·(260 + 32) = 4672 parameters.
    assert measured["mll+mrl"]["embedding"] == 8320 and measured["3d-ml"]["embedding"] == 4672
    assert measured["3d-ml"]["trainable"] == measured["mll+mrl"]["trainable"] - 8320 + 4672
    assert parameters["ratio"] == round(measured["3d-ml"]["trainable"] / measured["mll+mrl"]["trainable"], 3)
    assert all(value["peak_bytes"] > 0 for value in measured.values())


def test_bench_item_7_reports_optimizer_state_bytes(corpus_dir, tmp_path, capsys):
    report, _ = run_bench("7", corpus_dir, tmp_path, capsys)
    (row,) = report["rows"]
    state, parameters = row["raw"]["state_bytes"], row["raw"]["parameters"]
    # AdamW keeps two fp32 moments: 8 B/param (plus a 4-byte step counter per tensor).
    assert state["adamw"] / parameters == pytest.approx(8.0, abs=0.1)
    # bitsandbytes quantises tensors of >= 4096 elements to uint8 moments; the tiny model's small ones stay fp32.
    assert state["adamw8bit"] < state["adamw"] and row["ratio"] == round(state["adamw8bit"] / state["adamw"], 3)


def test_bench_item_8_compares_the_same_texts_padded_and_packed(corpus_dir, tmp_path):
    out = tmp_path / "latest.json"
    long_texts = list(TINY)
    long_texts[TINY.index("--max-length") + 1] = "256"  # 32 tokens cut most texts to one length: nothing to pack
    assert main([*long_texts, "--items", "8", "--corpus", str(corpus_dir), "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    raw = row["raw"]
    # The padded side is really padded (it was packed too once: the tokenizer, not data.packing, lays batches out).
    assert raw["padding_fraction"]["padded"] > raw["padding_fraction"]["packed"]
    assert max(abs(a - b) for a, b in zip(raw["losses"]["padded"], raw["losses"]["packed"])) < 1e-5
    seconds = raw["seconds"]
    assert row["ratio"] == pytest.approx(seconds["padded"] / seconds["packed"], abs=1e-3)
