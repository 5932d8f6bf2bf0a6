"""The public model API: cells from the plugins alone, encode at any cells with one forward per model-side setting,
settings that are always restored, and a run loader that never executes code from a checkpoint."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from experiments.config import compose
from experiments.loading import RunLoadError, load_run
from experiments.run import build
from lightning_modules.embedding_model import EmbeddingModel

TEXTS = ["Datei öffnen", "Open file", "x" * 40, "ok"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The untrained tiny 3D-ML model (MLL exits 1, 2, 4; MRL dims 32, 16, 8; MEL ranks 16, 8), eval mode."""
    config = compose("tiny", [f"output_dir={tmp_path_factory.mktemp('out')}"])
    module, datamodule = build(config)
    return EmbeddingModel(module.eval(), datamodule.tokenize, batch_size=3)


def test_cells_come_from_the_plugins_in_tag_order(model):
    cells = model.cells()
    assert len(cells) == 2 * 3 * 3
    assert [cell.name for cell in cells[:4]] == ["layer_1/dim_32/rank_16", "layer_1/dim_16/rank_16",
                                                 "layer_1/dim_8/rank_16", "layer_2/dim_32/rank_16"]
    assert cells[-1].name == "layer_4/dim_8/rank_8" and cells[-1].bytes == 8 * 4
    assert model.module.settings() == [{"rank": 16}, {"rank": 8}]
    assert model.full_cell().name == "layer_4/dim_32/rank_16"


def test_applied_setting_is_restored_even_after_an_error(model):
    module = model.module
    mel = module.model_side[0]
    mel.set(16)
    with pytest.raises(RuntimeError, match="inside"):
        with module.applied({"rank": 8}):
            assert mel.current() == 8 and mel.embedding.rank == 8
            raise RuntimeError("inside")
    assert mel.current() == 16
    with pytest.raises(ValueError, match=r"no model-side axis has the tag\(s\) \['ffn'\]; the run's: \['rank'\]"):
        with module.applied({"ffn": 4}):
            pass


def test_encode_uses_one_forward_per_setting_and_equals_the_cell_by_hand(model, monkeypatch):
    module, cells = model.module, model.cells()
    calls = []
    forward = type(module.backbone).forward
    monkeypatch.setattr(type(module.backbone), "forward",
                        lambda self, *args: calls.append(module.model_side[0].current()) or forward(self, *args))
    encoded = model.encode(TEXTS, cells, prompt="passage")
    assert calls == [16, 8, 16, 8]  # two batches of 3 + 1 texts, one forward per rank each
    monkeypatch.undo()
    batch = model.tokenize.encode([model.tokenize.passage_prefix + text for text in TEXTS])
    with torch.no_grad():
        for cell in cells:
            with module.applied({"rank": cell.tags["rank"]}):
                bundle = module.backbone(batch["input_ids"], batch["attention_mask"])
            expected = F.normalize(bundle.layer(cell.layer)[:, : cell.dim], dim=-1)
            torch.testing.assert_close(encoded[cell.name], expected, atol=1e-6, rtol=1e-5, msg=cell.name)
    one = model.encode(TEXTS, "layer_2/dim_16/rank_8")
    assert one.shape == (len(TEXTS), 16) and torch.allclose(one.norm(dim=-1), torch.ones(len(TEXTS)))
    with pytest.raises(ValueError, match="prompt 'doc' not allowed"):
        model.encode(TEXTS, cells[0], prompt="doc")


class Payload:
    """Unpickling this runs a shell command (what a crafted checkpoint would do)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, capsys):
    from experiments.export import main as export_main

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    OmegaConf.save(compose("tiny", [f"output_dir={tmp_path}"]), run_dir / "config.yaml", resolve=True)
    marker = tmp_path / "pwned.txt"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "x": Payload(marker)}, checkpoint)
    with pytest.raises(RunLoadError, match="cannot be read as a checkpoint of tensors.*nothing in it was executed"):
        load_run(checkpoint)
    assert export_main([str(checkpoint)]) == 2
    assert "export error:" in capsys.readouterr().err
    assert not marker.exists()


def test_a_run_folder_or_a_missing_file_is_named_with_what_to_pass(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(RunLoadError, match=f"^{run_dir} is a run folder; pass one of its checkpoints: it has none$"):
        load_run(run_dir)
    (run_dir / "checkpoints" / "last.ckpt").touch()
    (run_dir / "checkpoints" / "step=10.ckpt").touch()
    with pytest.raises(RunLoadError, match=r"is a run folder; pass one of its checkpoints: .*/checkpoints/last\.ckpt, "
                                           r".*/checkpoints/step=10\.ckpt$"):
        load_run(run_dir)
    with pytest.raises(RunLoadError, match="no such checkpoint file"):
        load_run(run_dir / "checkpoints" / "best.ckpt")
