"""Non-finite losses: ``raise`` an error naming the maps, or ``skip`` the batch leaving the model as it was.

:class:`NonFiniteLossGuard` is the base class of :class:`~lomix_lightning.LoMixSegmentationModule` (it uses the
module's ``criterion`` and ``hparams.nonfinite_loss``). On the CPU the check reads one flag per step (under
DDP one all-reduce, so every rank takes the same branch); on an accelerator ``raise`` mode keeps the first
non-finite step on the device and reads it at logging steps and at the end of the epoch.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lomix_lightning.checks import attached_trainer
from lomix_lightning.losses.lomix import LoMixLossOutput

__all__ = ["NonFiniteLossGuard"]


class NonFiniteLossGuard(pl.LightningModule):
    """Base class: the ``nonfinite_loss`` policy of a LoMix module (``raise`` or ``skip``), see the module's docs.

    The module calls :meth:`_init_nonfinite_guard` in ``__init__``, :meth:`_buffers_before_step` before the forward
    pass and :meth:`_guard_nonfinite` on the loss; a ``True`` from it means: return
    :meth:`_skipped_batch_output` from ``training_step``.
    """

    def _init_nonfinite_guard(self) -> None:
        self.skipped_batches = 0
        self._skip_update = False
        self._first_nonfinite: dict[str, Tensor] | None = None  # raise mode on an accelerator, see _guard_nonfinite

    def _buffers_before_step(self) -> list[Tensor] | None:
        """Skip mode: a copy of every buffer (the forward pass updates BatchNorm statistics; a skip must not)."""
        return [b.detach().clone() for b in self.buffers()] if self.hparams.nonfinite_loss == "skip" else None

    def _guard_nonfinite(self, result: LoMixLossOutput, batch_idx: int, saved: list[Tensor] | None) -> bool:
        """Apply the policy to this step's loss: raise, or return whether to skip the batch (buffers restored)."""
        if self.hparams.nonfinite_loss == "raise" and self._defer_nonfinite_check():
            self._nonfinite_record(result, batch_idx)
            return False
        if not self._nonfinite_now(result, batch_idx):  # raise mode raises there; True: skip this batch
            return False
        with torch.no_grad():  # every buffer back to its value before this batch's forward pass
            for buffer, value in zip(self.buffers(), saved):
                buffer.copy_(value)
        return True

    def _defer_nonfinite_check(self) -> bool:
        """Whether ``raise`` mode checks later (on an accelerator, where reading the flag would drain the queue).

        On the CPU reading a flag costs nothing, so the check runs at once; elsewhere the flag is kept on the
        device and read at the next logging step and at the end of the epoch (see :meth:`_nonfinite_raise_pending`).
        """
        return self.device.type != "cpu"

    def _nonfinite_now(self, result: LoMixLossOutput, batch_idx: int) -> bool:
        """Check now (one host read; under DDP one all-reduce): raise, or return whether to skip the batch."""
        local_flag = (~torch.isfinite(result.total)).to(torch.float32)
        # every rank takes the same branch, so DDP never waits for a missing backward
        if not bool(self._sum_over_ranks(local_flag) > 0):
            return False
        local = bool(local_flag > 0)
        bad = [n for n, v in zip(self.criterion.map_names, result.per_map.tolist()) if not math.isfinite(v)]
        where = f"in maps {bad or ['<weights>']}" if local else "on another rank"
        message = f"non-finite loss at step {self.global_step} (batch {batch_idx}) {where}"
        if self.hparams.nonfinite_loss == "raise":
            raise FloatingPointError(message + "; set nonfinite_loss='skip' to skip such batches")
        self.skipped_batches += 1
        warnings.warn(message + "; batch skipped", stacklevel=4)
        self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
        return True

    def _sum_over_ranks(self, value: Tensor) -> Tensor:
        """``value`` summed over all processes (one all-reduce; none on one device)."""
        trainer = attached_trainer(self)
        if trainer is None or trainer.world_size <= 1:
            return value
        return trainer.strategy.reduce(value.clone(), reduce_op="sum")  # the all-reduce works in place

    def _skipped_batch_output(self) -> Tensor | None:
        """What ``training_step`` returns for a skipped batch: nothing on one device, an exact zero under DDP."""
        trainer = attached_trainer(self)
        if trainer is None or trainer.world_size <= 1:
            return None  # Lightning skips backward and the optimizer step
        # DDP forbids returning None: every rank returns an exact zero that reaches every parameter (so the
        # gradient all-reduce runs as usual) and the optimizer step is dropped in on_before_optimizer_step
        self._skip_update = True
        return sum(p.reshape(-1)[:0].sum() for p in self.parameters() if p.requires_grad)

    def _nonfinite_record(self, result: LoMixLossOutput, batch_idx: int) -> None:
        """``raise`` mode on an accelerator: remember the first non-finite step on the device (no host sync)."""
        bad = ~torch.isfinite(result.total)
        if self._first_nonfinite is None:
            self._first_nonfinite = {
                "flag": torch.zeros((), dtype=torch.bool, device=bad.device),
                "where": torch.zeros(2, dtype=torch.long, device=bad.device),  # (global step, batch index)
                "per_map": torch.zeros_like(result.per_map.detach()),
            }
        state = self._first_nonfinite
        new = bad & ~state["flag"]
        here = torch.tensor([self.global_step, batch_idx], device=bad.device)  # a host-to-device copy, no sync
        state["where"] = torch.where(new, here, state["where"])
        state["per_map"] = torch.where(new, result.per_map.detach(), state["per_map"])
        state["flag"] = state["flag"] | bad

    def _nonfinite_raise_pending(self) -> None:
        """Read the deferred ``raise``-mode flag (one host read, under DDP one all-reduce) and raise if it is set."""
        state = self._first_nonfinite
        if state is None:
            return
        local_flag = state["flag"].to(torch.float32)
        if not bool(self._sum_over_ranks(local_flag) > 0):
            return
        if bool(local_flag > 0):
            step, batch_idx = state["where"].tolist()
            names = self.criterion.map_names
            bad = [n for n, v in zip(names, state["per_map"].tolist()) if not math.isfinite(v)]
            where = f"at step {step} (batch {batch_idx}) in maps {bad or ['<weights>']}"
        else:
            where = "on another rank"
        raise FloatingPointError(
            f"non-finite loss {where} (found at step {self.global_step}: on an accelerator the check is read at "
            "logging steps); set nonfinite_loss='skip' to skip such batches"
        )

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        trainer = attached_trainer(self)
        every = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1) if trainer is not None else 1
        if self._first_nonfinite is not None and (self.global_step % every == 0):
            self._nonfinite_raise_pending()

    @override
    def on_train_epoch_end(self) -> None:
        self._nonfinite_raise_pending()

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_update:  # a skipped non-finite batch under DDP: no update on any rank
            optimizer.zero_grad(set_to_none=True)
            self._skip_update = False

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lomix_skipped_batches"] = self.skipped_batches

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_batches = int(checkpoint.get("lomix_skipped_batches", 0))
