"""Stops a run whose loss goes non-finite (NaN / inf) before a bad checkpoint exists, or skips a bounded number of
such steps.

Default (``max_nonfinite_steps: 0``): each step ORs ``~isfinite(loss)`` into a device-side flag (no host sync);
the flag is read at the logger's interval, at every checkpoint step (before ``ModelCheckpoint`` saves, together
with a check of the weights) and at the last step. A bad flag raises :class:`NonFiniteLossError`: Lightning marks
the MLflow run FAILED, and ``last.ckpt`` stays the last good one.

With ``max_nonfinite_steps: N > 0`` every step's gradients are checked before the optimizer step (one host sync
per step: skipping an update needs the answer before it happens). A step with a non-finite gradient is skipped
(no parameter changes: gradients dropped, AdamW leaves parameters without one alone) and counted in
``train/nonfinite_steps``; step N + 1 stops the run as above.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

SHOWN_METRICS = 4  # non-finite metric names quoted in the message


def all_finite(trainer: L.Trainer, tensors: list[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` on every rank is finite, by the max norm (which cannot overflow); local
    shards of FSDP2 ``DTensor``s; one host sync, plus one all-reduce of the answer when distributed."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    finite = not local or bool(torch.stack(torch._foreach_norm(local, math.inf)).isfinite().all())
    return trainer.strategy.reduce_boolean_decision(finite, all=True)


class NonFiniteLossError(RuntimeError):
    """A non-finite loss; ``str()`` is one line naming the step, the batch's source and the non-finite terms."""


class NonFiniteGuard(L.Callback):
    """See the module docstring.

    Args:
        checkpoint_every: the run's checkpoint interval (checked before each save).
        max_skipped: non-finite steps skipped (counted) before the run stops; 0: the first one stops it.
        checkpoint: the run's ``last.ckpt``, named in the message when it exists (None: not named).

    Example:
        >>> trainer = L.Trainer(callbacks=[NonFiniteGuard(checkpoint_every=50), ModelCheckpoint(...)])
    """

    def __init__(self, checkpoint_every: int, max_skipped: int = 0, checkpoint: Path | None = None) -> None:
        self.checkpoint_every = checkpoint_every
        self.checkpoint = checkpoint
        self.max_skipped = max_skipped
        self.skipped = 0
        self._bad: torch.Tensor | None = None  # device flag: some loss since the last check was not finite
        self._first_bad_step: torch.Tensor | None = None
        self._sources: dict[int, str] = {}  # step -> batch source since the last check (host strings, no sync)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed run starts from finite weights, or stops naming its checkpoint (not the learning rate)."""
        if trainer.ckpt_path and not all_finite(trainer, [p.detach() for p in pl_module.parameters()]):
            raise NonFiniteLossError(f"checkpoint {trainer.ckpt_path} (step {trainer.global_step}) holds non-finite "
                                     f"weights (NaN/inf): it cannot be resumed; resume=false starts a new run")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self.max_skipped:
            return
        if all_finite(trainer, [p.grad for p in pl_module.parameters() if p.grad is not None]):
            return
        self.skipped += 1
        if self.skipped > self.max_skipped:
            self._stop(pl_module, self.checkpoint, trainer.global_step, f"{self.skipped} non-finite steps, more than "
                                                       f"max_nonfinite_steps={self.max_skipped}")
        for parameter in pl_module.parameters():
            parameter.grad = None  # AdamW skips parameters without a gradient: no update, no decay, no moment change

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step - 1  # the optimizer step that just ran
        if self.max_skipped:
            pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        else:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            bad = ~torch.isfinite(loss.detach())
            if self._bad is None:
                self._bad, self._first_bad_step = torch.zeros_like(bad), torch.full_like(bad, -1, dtype=torch.long)
            self._first_bad_step = torch.where(bad & ~self._bad, step, self._first_bad_step)
            self._bad = self._bad | bad
            self._sources[step] = batch.get("source", "?") if isinstance(batch, dict) else "?"
        if self._check_now(trainer):
            self.check(trainer, pl_module)

    def _check_now(self, trainer: L.Trainer) -> bool:
        step, every = trainer.global_step, trainer.log_every_n_steps
        return (step % self.checkpoint_every == 0 or step >= trainer.max_steps > 0
                or bool(every) and step % every == 0 or trainer.should_stop)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reads the flag (one host sync) and the weights' finiteness; raises on either."""
        bad_here = self._bad is not None and bool(self._bad)
        if trainer.strategy.reduce_boolean_decision(bad_here, all=False):  # every rank stops together
            first = int(self._first_bad_step) if bad_here else trainer.global_step - 1
            self._stop(pl_module, self.checkpoint, first, f"source {self._sources.get(first, 'on another device')!r}")
        self._sources.clear()
        if not all_finite(trainer, [p.detach() for p in pl_module.parameters()]):
            self._stop(pl_module, self.checkpoint, trainer.global_step - 1,
                       "the loss was finite but the weights are not")

    @staticmethod
    def _stop(pl_module: L.LightningModule, checkpoint: Path | None, step: int, detail: str) -> None:
        # The module's last logged metrics (MatryoshkaEmbedder.last_logged: written at every check step).
        logged = getattr(pl_module, "last_logged", {})
        bad = sorted(key for key, value in logged.items() if key.startswith("train/loss") and not math.isfinite(value))
        named = ", ".join(bad[:SHOWN_METRICS]) + (f" and {len(bad) - SHOWN_METRICS} more" if len(bad) > SHOWN_METRICS
                                                  else "")
        kept = (f"{checkpoint} is the last good one" if checkpoint is not None and checkpoint.exists()
                else "no checkpoint was saved before it")
        raise NonFiniteLossError(
            f"non-finite loss at step {step} ({detail}; non-finite now: {named or 'the total train/loss'}); "
            f"stopped, {kept}; lower optim.lr or set max_nonfinite_steps")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict["skipped"]
