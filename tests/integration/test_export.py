"""Export of one cell: the exported folder reproduces the training embeddings at that cell."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open

from experiments.config import compose
from experiments.export import main
from experiments.loading import LoadedRun, RunLoadError, load_run, run_cells
from experiments.run import build, train
from lightning_modules.embedding_model import CellError, EmbeddingModel
from lightning_modules.cell_export import ExportError, export_cell, load_exported, model_card, probe_scores
from lightning_modules.plugins.precision import QUANTIZE_SNIPPET, Precision, PrecisionConfig, binary, int8
from contracts.cells import Cell
from tests.conftest import run_overrides

# Different lengths (padding), non-Latin scripts, and one text longer than max_length (truncation).
TEXTS = ["The file could not be opened.", "Die Datei konnte nicht geöffnet werden.", "ok",
         "Файл не найден", "x" * 30 + " very long " * 8]
VOCAB, HIDDEN = 260, 32  # tiny backbones: byte tokenizer, hidden 32, 4 blocks, MEL ranks [16, 8]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_dir, mlflow_dir):
    """Two trained tiny runs: an encoder with e5-style prompts, a decoder whose tokenizer has eos == pad."""
    overrides = {
        "tiny_bert": ["model.source=tiny_bert", "model.query_prefix='query: '", "model.passage_prefix='passage: '"],
        "tiny_qwen3": ["model.source=tiny_qwen3", "model.tiny.eos_is_pad=true"],
    }
    loaded = {}
    for source, extra in overrides.items():
        root = tmp_path_factory.mktemp(source)
        config = compose("tiny", [*run_overrides(root, corpus_dir, mlflow_dir), "trainer.max_steps=3", *extra])
        loaded[source] = load_run(train(config).checkpoint)
    return loaded


def cell(layer: int, dim: int, rank: int | None) -> Cell:
    tags = {"layer": layer, "dim": dim} | ({"rank": rank} if rank is not None else {})
    return Cell(tags, 4 * dim)


def export(run: LoadedRun, out, layer: int | None = None, dim: int | None = None, rank: int | None = None,
           mode: str = "compat"):
    tags = {key: value for key, value in (("layer", layer), ("dim", dim), ("rank", rank)) if value is not None}
    return export_cell(run.model, out, run.model.cell(**tags), run.origin(), mode)


def safetensor_shapes(path) -> dict[str, list[int]]:
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}


@pytest.mark.parametrize("source, mode, layer, dim, rank", [
    ("tiny_bert", "compat", 2, 16, 8),
    ("tiny_bert", "factorized", 4, 32, 16),
    ("tiny_qwen3", "compat", 1, 8, 16),
    ("tiny_qwen3", "factorized", 2, 16, 8),
])
def test_exported_embeddings_equal_training_embeddings_at_the_cell(runs, tmp_path, source, mode, layer, dim, rank):
    run = runs[source]
    result = export(run, tmp_path / "export", layer, dim, rank, mode)
    assert result.cell.name == f"layer_{layer}/dim_{dim}/rank_{rank}"
    model = load_exported(result.path)
    assert model.truncate_dim == dim and model.get_embedding_dimension() == dim
    for prompt, encode in (("query", model.encode_query), ("passage", model.encode_document)):
        exported = encode(TEXTS, convert_to_tensor=True)
        expected = run.model.encode(TEXTS, result.cell, prompt)
        assert exported.shape == (len(TEXTS), dim)
        assert (exported - expected).abs().max().item() <= 1e-5, prompt
    # The same texts at another rank/depth give different embeddings: the comparison can fail.
    other = run.model.cell(layer=4 if layer != 4 else 2, dim=dim, rank=16 if rank == 8 else 8)
    assert (model.encode_query(TEXTS, convert_to_tensor=True) - run.model.encode(TEXTS, other)).abs().max() > 1e-3

    saved = json.loads((result.path / "config.json").read_text())
    assert saved["num_hidden_layers"] == layer
    shapes = safetensor_shapes(result.path)
    if mode == "factorized":
        assert [rank, HIDDEN] in shapes.values() and [VOCAB, rank] in shapes.values()
        assert [VOCAB, HIDDEN] not in shapes.values()  # the merged matrix is not stored
    else:
        assert [VOCAB, HIDDEN] in shapes.values() and not any(key.endswith((".left", ".right")) for key in shapes)


def test_parameter_counts_of_both_modes(runs, tmp_path):
    results = {mode: export(runs["tiny_qwen3"], tmp_path / mode, 2, 16, 8, mode) for mode in ("compat", "factorized")}
    # Qwen3 has no unused heads: the stored tensors are exactly the counted parameters.
    stored = {mode: sum(int(np.prod(shape)) for shape in safetensor_shapes(result.path).values())
              for mode, result in results.items()}
    assert {mode: result.parameters for mode, result in results.items()} == stored
    # vocab·d merged vs vocab·r + r·d factorised: 260·32 − 8·(260 + 32) = 5984 fewer.
    assert stored["compat"] - stored["factorized"] == VOCAB * HIDDEN - 8 * (VOCAB + HIDDEN) == 5984
    card = (tmp_path / "factorized" / "README.md").read_text()
    assert "layer_2/dim_16/rank_8" in card and f"{stored['factorized']:,}" in card
    assert f"{8 * (VOCAB + HIDDEN):,} parameters factorized" in card and f"{VOCAB * HIDDEN:,} as the merged" in card


def test_decoder_tokenizer_reproduces_training_batches(runs, tmp_path):
    run = runs["tiny_qwen3"]
    model = load_exported(export(run, tmp_path / "export", 2, 16, 8).path)
    texts = ["ab", "abcd", "y" * 100]  # padding with eos == pad, and truncation to max_length with EOS last
    features, expected = model.preprocess(texts), run.model.tokenize.encode(texts)
    assert features["input_ids"].tolist() == expected["input_ids"].tolist()
    assert features["attention_mask"].tolist() == expected["attention_mask"].tolist()
    eos = run.model.tokenize.tokenizer.eos_token_id
    assert eos == run.model.tokenize.pad_id
    assert [row[int(mask.sum()) - 1] for row, mask in zip(features["input_ids"].tolist(),
                                                           features["attention_mask"])] == [eos] * 3
    assert features["attention_mask"][0].tolist()[:4] == [1, 1, 1, 0]  # the EOS is kept, the pad (same id) is not


def no_mel_run(corpus_dir, tmp_path) -> LoadedRun:
    """An untrained tiny encoder without MEL (errors and the full-rank path need no training)."""
    config = compose("tiny", [*run_overrides(tmp_path, corpus_dir, tmp_path), "plugins.mel=null"])
    module, datamodule = build(config)
    return LoadedRun(EmbeddingModel(module.eval(), datamodule.tokenize), config, tmp_path, tmp_path / "none.ckpt", 0)


@pytest.mark.parametrize("tags, message", [
    ({"layer": 5}, r"layer 5 is not a value of this run; choose one of \[1, 2, 4\]"),
    ({"layer": 3}, r"layer 3 is not a value of this run; choose one of \[1, 2, 4\]"),
    ({"dim": 12}, r"dim 12 is not a value of this run; choose one of \[32, 16, 8\]"),
    ({"rank": 12}, r"rank 12 is not a value of this run; choose one of \[16, 8\]"),
    ({"ffn": 12}, r"the run has no 'ffn' axis; its axes: layer, dim, rank"),
])
def test_invalid_cells_are_rejected(runs, tags, message):
    with pytest.raises(CellError, match=message):
        runs["tiny_bert"].model.cell(**tags)
    with pytest.raises(CellError, match="CELL=layer_3/dim_32/rank_16 is not a cell of this run"):
        runs["tiny_bert"].model.cell("layer_3/dim_32/rank_16")


def test_a_part_of_a_cell_name_takes_the_other_tags_from_the_full_cell(runs):
    model = runs["tiny_bert"].model
    assert model.cell("layer_2").name == model.cell(layer=2).name == "layer_2/dim_32/rank_16"
    assert model.cell("rank_8/layer_1").name == model.cell("layer_1", rank=8).name == "layer_1/dim_32/rank_8"
    with pytest.raises(CellError, match="'layer2' is not a cell name"):
        model.cell("layer2")


def test_defaults_are_the_full_cell_and_the_largest_rank(runs):
    model = runs["tiny_bert"].model
    assert model.cell().name == model.full_cell().name == "layer_4/dim_32/rank_16"
    assert model.cell(layer=2).name == "layer_2/dim_32/rank_16"
    assert len(model.cells()) == 3 * 3 * 2 and model.cell("layer_1/dim_8/rank_8").tags == {"layer": 1, "dim": 8,
                                                                                         "rank": 8}


def test_run_without_mel(corpus_dir, tmp_path):
    run = no_mel_run(corpus_dir, tmp_path)
    with pytest.raises(CellError, match="the run has no 'rank' axis"):
        run.model.cell(rank=8)
    with pytest.raises(ExportError, match="MODE=factorized needs an axis with a factorized form"):
        export(run, tmp_path / "export", mode="factorized")
    with pytest.raises(ExportError, match="MODE='merged' not allowed"):
        export(run, tmp_path / "export", mode="merged")
    result = export(run, tmp_path / "export", 2, 8)
    assert result.cell.name == "layer_2/dim_8"
    exported = load_exported(result.path).encode(TEXTS, convert_to_tensor=True)
    assert (exported - run.model.encode(TEXTS, result.cell)).abs().max().item() <= 1e-5
    with pytest.raises(ExportError, match="exists and is not empty; choose a new folder or pass --overwrite"):
        export(run, tmp_path / "export", 2, 8)


def test_probe_scores_of_the_cell_reach_the_model_card(runs, tmp_path):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "probe_step_3.csv").write_text(  # the layout of evaluation/report.py
        "step,task,layer,dim,rank,main_score\n"
        "0,bitext,2,16,8,0.10\n"
        "3,bitext,2,16,8,0.25\n"
        "3,bitext,2,16,16,0.30\n"
        "3,retrieval,2,16,8,0.50\n"
        "3,bitext,4,16,8,0.90\n")
    cell = Cell({"layer": 2, "dim": 16, "rank": 8}, 64)
    assert probe_scores(tmp_path / "probe" / "probe_step_3.csv", cell) == {"bitext/main_score": 0.25,
                                                                         "retrieval/main_score": 0.5}
    json_table = tmp_path / "probe.json"
    json_table.write_text(json.dumps({"rows": [{"layer": 2, "dim": 16, "rank": 8, "ndcg": 0.4}]}))
    assert probe_scores(json_table, cell) == {"ndcg": 0.4}
    json_table.write_text(json.dumps({"rows": [  # a precision axis: one row per level, bytes are not a score
        {"layer": 2, "dim": 16, "rank": 8, "precision": level, "bytes": size, "task": "bitext", "main_score": score}
        for level, size, score in (("fp32", 64, 0.4), ("binary", 2, 0.3))]}))
    assert probe_scores(json_table, cell) == {"bitext/main_score [precision fp32]": 0.4,
                                              "bitext/main_score [precision binary]": 0.3}
    json_table.unlink()
    run = dataclasses.replace(runs["tiny_bert"], run_dir=tmp_path)
    result = export(run, tmp_path / "export", 2, 16, 8)
    card = model_card(run.model, result, run.origin())
    assert "| bitext/main_score | 0.2500 |" in card and "| retrieval/main_score | 0.5000 |" in card
    assert "## Storing int8 or binary vectors" not in card  # no precision axis in this run


def test_model_card_of_a_precision_run_stores_the_vectors_the_probe_scored(runs, tmp_path, monkeypatch):
    run = dataclasses.replace(runs["tiny_bert"], run_dir=tmp_path)
    module = run.model.module
    precision = Precision(PrecisionConfig(weights=[1.0, 0.0, 2.0]), module.backbone.info, seed=0)
    monkeypatch.setattr(module, "plugins", [*module.plugins, precision])
    card = model_card(run.model, export(run, tmp_path / "export", 2, 16, 8, "compat"), run.origin())
    assert "| int8 | 0 | 16 |" in card and "| binary | 2 | 2 |" in card and "| fp32 | 1 | 64 |" in card
    assert QUANTIZE_SNIPPET in card
    embeddings = torch.nn.functional.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    embeddings[0, 3] = 0.0  # a zero coordinate is a 1 bit, as in the plugin
    stub = type("Model", (), {"encode_document": lambda self, texts: embeddings.numpy()})()
    scope = {"model": stub, "texts": ["a"] * 6}
    exec(QUANTIZE_SNIPPET, scope)
    codes, bits = torch.from_numpy(scope["codes"]).float(), np.unpackbits(scope["bits"], axis=1)[:, :16]
    scale = embeddings.abs().amax(dim=1, keepdim=True) / 127
    torch.testing.assert_close(codes * scale, int8(embeddings))
    assert codes.abs().amax(dim=1).eq(127).all() and scope["codes"].dtype == np.int8
    torch.testing.assert_close(torch.from_numpy(bits * 2.0 - 1).float(), torch.sign(binary(embeddings)))
    assert scope["bits"].shape == (6, 2)


def test_cli_exports_checks_and_reports_errors(runs, capsys):
    checkpoint = str(runs["tiny_bert"].checkpoint)
    assert main([checkpoint, "--layers", "9"]) == 2
    assert "export error: layer 9 is not a value of this run; choose one of [1, 2, 4]" in capsys.readouterr().err
    assert main([checkpoint, "--cell", "layer_2/dim_16/rank_8", "--layers", "2"]) == 2
    assert "CELL=layer_2/dim_16/rank_8 and the layer option name the same axis" in capsys.readouterr().err
    assert main([checkpoint, "--cell", "layer_2/ffn_8"]) == 2
    assert "export error: the run has no 'ffn' axis; its axes: layer, dim, rank" in capsys.readouterr().err
    assert main([checkpoint, "--cell", "layer_2/dim_16/rank_8", "--out", str(runs["tiny_bert"].run_dir / "by_name")]) == 0
    assert "exported cell layer_2/dim_16/rank_8 (compat)" in capsys.readouterr().out
    assert main([checkpoint, "--layers", "1", "--dim", "8", "--rank", "8", "--mode", "factorized"]) == 0
    out = capsys.readouterr().out
    expected_dir = runs["tiny_bert"].run_dir / "export" / "layer_1-dim_8-rank_8-factorized"
    assert f"to {expected_dir}" in out and (expected_dir / "modeling_factorized.py").is_file()
    assert float(out.split("max |export - training| over 3 texts = ")[1].split()[0]) <= 1e-5


def test_cli_checks_the_cell_and_the_folder_before_loading_any_weights(runs, capsys, monkeypatch, tmp_path):
    """Before: a bad CELL/LAYERS or an existing folder was reported after the run's weights had loaded (~28 s for
    the quickstart); the folder error named only the CLI's flag, not make's ARGS=--overwrite."""
    import experiments.loading
    import experiments.run

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(experiments.loading, "load_run", no_weights)
    monkeypatch.setattr(experiments.run, "build", no_weights)
    checkpoint = str(runs["tiny_bert"].checkpoint)
    assert main([checkpoint, "--layers", "5"]) == 2
    assert "export error: layer 5 is not a value of this run; choose one of [1, 2, 4]" in capsys.readouterr().err
    assert main([checkpoint, "--cell", "layer_3/dim_32/rank_16"]) == 2
    assert "CELL=layer_3/dim_32/rank_16 is not a cell of this run" in capsys.readouterr().err
    (tmp_path / "taken" / "kept.txt").parent.mkdir()
    (tmp_path / "taken" / "kept.txt").write_text("mine")
    assert main([checkpoint, "--out", str(tmp_path / "taken")]) == 2
    assert (f"OUT={tmp_path / 'taken'} exists and is not empty; choose a new folder or pass --overwrite (make export "
            f"... ARGS=--overwrite)") in capsys.readouterr().err


@pytest.mark.parametrize("source", ["tiny_bert", "tiny_qwen3"])
def test_the_cells_from_a_run_config_are_the_trained_models_cells(runs, source):
    assert run_cells(runs[source].config) == runs[source].model.cells()


CLEAN_LOADER = textwrap.dedent("""
    import sys

    import numpy as np

    class NoProject:  # the exported folders must load without this project's packages
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"lightning_modules", "experiments", "datamodules", "callbacks", "bench"}:
                raise ImportError(f"{name} imported while loading an export")

    sys.meta_path.insert(0, NoProject())
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    compat, factorized, texts_file, out = sys.argv[1:]
    texts = open(texts_file, encoding="utf8").read().split("\\n")
    np.save(f"{out}/compat.npy", SentenceTransformer(compat).encode_query(texts))
    np.save(f"{out}/factorized.npy", SentenceTransformer(factorized, trust_remote_code=True).encode_query(texts))
    assert AutoModel.from_pretrained(compat).config.num_hidden_layers == 2
    assert type(AutoModel.from_pretrained(factorized, trust_remote_code=True).get_input_embeddings()).__name__ \\
        == "FactorizedEmbedding"
    try:
        AutoModel.from_pretrained(factorized)  # without the loader: refused, never a random embedding
    except ValueError as error:
        print("refused:", str(error).splitlines()[0])
""")


def test_exports_load_without_the_project(runs, tmp_path):
    compat = export(runs["tiny_bert"], tmp_path / "compat", 2, 16, 8, "compat")
    factorized = export(runs["tiny_qwen3"], tmp_path / "factorized", 1, 8, 16, "factorized")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS), encoding="utf8")
    (tmp_path / "load.py").write_text(CLEAN_LOADER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    completed = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(compat.path), str(factorized.path),
                                str(tmp_path / "texts.txt"), str(tmp_path)], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "refused: " in completed.stdout and "trust_remote_code" in completed.stdout
    for name, result, run in (("compat", compat, runs["tiny_bert"]), ("factorized", factorized, runs["tiny_qwen3"])):
        loaded = torch.from_numpy(np.load(tmp_path / f"{name}.npy"))
        assert (loaded - run.model.encode(TEXTS, result.cell)).abs().max().item() <= 1e-5, name
