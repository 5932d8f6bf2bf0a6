"""``train(compose("tiny", overrides))`` as the project runs it, on 2 CPU processes, one or more runs in a row:

    python -m tests.distributed.train_worker OUT_DIR k=v ... [-- k=v ... ]       # Lightning's launcher starts rank 1
    torchrun --standalone --nproc-per-node 2 -m tests.distributed.train_worker OUT_DIR ...  # external launch

Batches are fixed texts (:func:`use_fixed_batches`): each rank gets its half of global batch ``step``, so one
process given the whole global batch is the reference, whatever the DataModule's sharding does.
Run ``i`` writes ``OUT_DIR/run<i>_rank<r>.pt``: the rank's local losses, its shard of every parameter (local and
global shape), its local state (parameters, optimizer moments) when training starts (after any resume) and ends, and
the MLflow run id.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from datamodules.pairs import TranslationPairsDataModule
from experiments.config import compose
from experiments.run import train
from lightning_modules.distributed import activation_checkpointing_enabled
from lightning_modules.module import MatryoshkaEmbedder

GLOBAL_BATCH = 16
WORDS = "alpha beta gamma delta haus maison casa дом σπίτι 家 bahay nyumba talo etxea".split()


def global_texts(step: int) -> tuple[list[str], list[str]]:
    """Queries and passages of global batch ``step`` (every rank derives the same)."""
    rng = random.Random(step)
    passages = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(GLOBAL_BATCH)]
    return [f"{i}: {text[::-1]}" for i, text in enumerate(passages)], passages


def fixed_train_dataloader(self: TranslationPairsDataModule):
    """This rank's slice of global batches ``global_step, global_step + 1, ...`` (resume continues the sequence)."""
    rank, world_size, step = self.trainer.global_rank, self.trainer.world_size, self.trainer.global_step
    per_rank = GLOBAL_BATCH // world_size
    while True:
        queries, passages = global_texts(step)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        yield {**self.tokenize(queries[rows], passages[rows]), "in_batch": True}
        step += 1


def use_fixed_batches(setattr_=setattr) -> None:
    """Replaces the DataModule's batches by :func:`fixed_train_dataloader` (pass ``monkeypatch.setattr`` in tests)."""
    setattr_(TranslationPairsDataModule, "train_dataloader", fixed_train_dataloader)
    setattr_(TranslationPairsDataModule, "on_after_batch_transfer", lambda self, batch, index: batch)


def local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().clone()


def snapshot(module: MatryoshkaEmbedder) -> dict:
    if hasattr(module.backbone, "reshard"):  # after a forward without backward (a probe) FSDP2 keeps the root gathered
        module.backbone.reshard()
    optimizer = module.trainer.optimizers[0]
    names = {id(p): name for name, p in module.named_parameters()}
    moments = {f"{names[id(p)]}.{key}": local(value) for p, state in optimizer.state.items()
               for key, value in state.items() if isinstance(value, torch.Tensor) and key != "step"}
    return {"step": module.global_step, "params": {name: local(p) for name, p in module.named_parameters()},
            "moments": moments}


def main(out_dir: str, runs: list[list[str]]) -> None:
    record: dict = {}
    training_step = MatryoshkaEmbedder.training_step

    def recording_step(self, batch, batch_idx):
        loss = training_step(self, batch, batch_idx)
        record["losses"].append(loss.item())
        return loss

    def on_train_start(self):
        record["rank"] = self.global_rank
        record["activation_checkpointing"] = activation_checkpointing_enabled(self.backbone)
        record["start"] = snapshot(self)
        record["shards"] = {name: (tuple(local(p).shape), tuple(p.shape), type(p).__name__)
                            for name, p in self.named_parameters()}

    def on_train_end(self):
        record["end"] = snapshot(self)

    use_fixed_batches()
    MatryoshkaEmbedder.training_step = recording_step
    MatryoshkaEmbedder.on_train_start = on_train_start
    MatryoshkaEmbedder.on_train_end = on_train_end
    for index, overrides in enumerate(runs):
        record.clear()
        record["losses"] = []
        result = train(compose("tiny", ["trainer.devices=2", "trainer.accelerator=cpu", *overrides]))
        record["checkpoint"] = str(result.checkpoint)
        record["run_id"] = result.run_id
        torch.save(record, Path(out_dir) / f"run{index}_rank{record['rank']}.pt")


if __name__ == "__main__":
    arguments = " ".join(sys.argv[2:]).split(" -- ")
    main(sys.argv[1], [run.split() for run in arguments])
