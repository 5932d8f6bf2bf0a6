"""The ``distributed`` section: validation, the Trainer's strategy and precision, FSDP2 units, activation
checkpointing (one process; the 2-process checks are in test_distributed_*.py)."""

import pytest
import torch
from torch import nn

from datamodules.tokenization import BatchTokenizer
from experiments.config import ConfigError
from experiments.run_folders import RUN_DIR_ENV, run_directory
from lightning_modules.backbone_adapter import Backbone
from lightning_modules.backbones.tiny import byte_tokenizer, tiny_bert, tiny_qwen3
from lightning_modules.distributed import (FSDP2Strategy, activation_checkpointing_enabled, resolve_precision,
                                           trainer_settings, transformer_blocks)
from lightning_modules.losses import ContrastiveLoss
from lightning_modules.module import MatryoshkaEmbedder
from lightning_modules.plugins import MLL, MRL
from tests.distributed.train_worker import global_texts


@pytest.mark.parametrize("overrides, key, message", [
    (["trainer.strategy=ddp"], "trainer.strategy", "set distributed.strategy instead (single | ddp | fsdp2)"),
    (["trainer.precision=bf16-mixed"], "trainer.precision", "set distributed.precision instead (auto | 32-true | bf16-mixed)"),
    (["distributed.strategy=deepspeed"], "distributed.strategy", "'deepspeed' not allowed; choose one of single, ddp, fsdp2"),
    (["trainer.devices=2"], "distributed.strategy", "single runs on one device but trainer.devices=2, trainer.num_nodes=1"),
    (["trainer.num_nodes=2", "distributed.strategy=single"], "distributed.strategy", "trainer.num_nodes=2"),
])
def test_bad_distributed_settings_name_the_key(tiny_config, overrides, key, message):
    with pytest.raises(ConfigError, match="config error at `" + key.replace(".", r"\.") + "`") as error:
        tiny_config("tiny", overrides)
    assert message in str(error.value)


def test_trainer_settings_per_strategy():
    assert trainer_settings("single", "32-true") == {"strategy": "auto", "precision": "32-true"}
    assert trainer_settings("ddp", "bf16-mixed") == {"strategy": "ddp", "precision": "bf16-mixed"}
    fsdp2 = trainer_settings("fsdp2", "32-true", sharded_checkpoint=False)["strategy"]
    assert isinstance(fsdp2, FSDP2Strategy) and fsdp2._save_distributed_checkpoint is False
    with pytest.raises(ValueError, match="distributed strategy 'fsdp'; allowed: single, ddp, fsdp2"):
        trainer_settings("fsdp", "32-true")


def test_auto_precision_is_bf16_only_on_a_cuda_device_with_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto") == "bf16-mixed"
    assert resolve_precision("auto", accelerator="cpu") == "32-true"
    assert resolve_precision("32-true") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a V100
    assert resolve_precision("auto") == "32-true"


def test_fsdp2_units_are_the_transformer_blocks():
    bert = tiny_bert(260, 32, 3, 2, 64)
    qwen = tiny_qwen3(260, 32, 3, 2, 64)
    assert transformer_blocks(bert) is bert.encoder.layer and transformer_blocks(qwen) is qwen.layers

    class NoBlocks(nn.Linear):
        config = bert.config

    with pytest.raises(ValueError, match="NoBlocks has no ModuleList of its 3 transformer blocks"):
        transformer_blocks(NoBlocks(2, 2))


def loss_and_grads(activation_checkpointing: bool) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    backbone = Backbone(tiny_qwen3(260, 32, 3, 2, 64).train(), "decoder")
    plugins = [MLL(MLL.Config(), backbone.info, 0), MRL(MRL.Config(), backbone.info, 0)]
    module = MatryoshkaEmbedder(backbone, plugins, ContrastiveLoss(), optim=None,
                                activation_checkpointing=activation_checkpointing)
    module.configure_model()  # no device mesh (no ModelParallelStrategy): only activation checkpointing
    assert activation_checkpointing_enabled(backbone) == activation_checkpointing
    batch = BatchTokenizer(byte_tokenizer(), "decoder", 32)(*global_texts(0))
    loss = sum(view.weight * sum(module.loss(view.embeddings, batch["num_queries"]).values())
               for view in module.views(batch, 0))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in module.named_parameters()}


def test_activation_checkpointing_changes_no_number():
    plain_loss, plain_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-6, msg=name)


def test_run_dir_from_the_environment_and_sharded_checkpoint_folders(tiny_config, tmp_path, monkeypatch):
    config = tiny_config("tiny")
    shared = tmp_path / "shared_run"
    monkeypatch.setenv(RUN_DIR_ENV, str(shared))
    assert run_directory(config) == (shared, None)
    (shared / "checkpoints" / "last.ckpt").mkdir(parents=True)  # FSDP2's sharded checkpoint is a folder
    assert run_directory(config) == (shared, shared / "checkpoints" / "last.ckpt")
    config.resume = False
    assert run_directory(config) == (shared, None)
    monkeypatch.delenv(RUN_DIR_ENV)
    config.resume = True
    run = tmp_path / "outputs" / "tiny" / "20260101-000000"
    (run / "checkpoints" / "last.ckpt").mkdir(parents=True)
    assert run_directory(config) == (run, run / "checkpoints" / "last.ckpt")
