"""Graceful stops of ``lomix fit``: SIGTERM or a first Ctrl-C end the run at a batch boundary with a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

__all__ = ["EXIT_CODES", "InterruptCheckpoint", "InterruptRecord"]

EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}
"""Exit status of an interrupted ``lomix`` run, as a shell reports a process killed by the signal."""


@dataclass
class InterruptRecord:
    """Where an interrupted run stopped.

    Attributes:
        signal: ``"SIGTERM"`` or ``"SIGINT"``.
        epoch: Epoch at the stop.
        step: Optimizer steps done.
        checkpoint: The checkpoint written (``None`` if none was, e.g. outside ``fit``).
        is_global_zero: Whether this process is rank zero (only it reports).

    Example:
        >>> InterruptRecord("SIGTERM", 2, 40, Path("run/interrupted.ckpt")).message()
        'interrupted (SIGTERM) at epoch 2, step 40; checkpoint saved to run/interrupted.ckpt (resume with --ckpt_path)'
    """

    signal: str
    epoch: int
    step: int
    checkpoint: Path | None = None
    is_global_zero: bool = True

    def message(self) -> str:
        """The one-line report."""
        where = f"interrupted ({self.signal}) at epoch {self.epoch}, step {self.step}"
        if self.checkpoint is None:
            return f"{where}; no checkpoint written"
        return f"{where}; checkpoint saved to {self.checkpoint} (resume with --ckpt_path)"

    @property
    def exit_code(self) -> int:
        """``128 + signal number`` (130 for Ctrl-C, 143 for SIGTERM)."""
        return EXIT_CODES.get(self.signal, 1)


class InterruptCheckpoint(Callback):
    """Stop at the next batch boundary on SIGTERM or a first Ctrl-C, and save a full checkpoint there.

    Lightning turns SIGTERM into a stop after the current batch (``SIGTERMException``, on every rank); this callback
    makes a first Ctrl-C (SIGINT) do the same, a second one abort at once, and saves ``filename`` (model, optimizer,
    loops, LoMix weights, callback states) next to the other checkpoints when the stop happens during ``fit``. The
    :class:`InterruptRecord` is attached to the exception as ``lomix_interrupt`` for the ``lomix`` command to report.

    Args:
        filename: Name of the checkpoint file.
        dirpath: Folder; default: the first ``ModelCheckpoint``'s folder, else ``<default_root_dir>/checkpoints``.

    Example:
        >>> InterruptCheckpoint().filename
        'interrupted.ckpt'
    """

    def __init__(self, filename: str = "interrupted.ckpt", dirpath: str | Path | None = None) -> None:
        if not isinstance(filename, str) or not filename.endswith(".ckpt"):
            raise ValueError(f"filename must be a string ending in '.ckpt', got {filename!r}")
        self.filename = filename
        self.dirpath = dirpath
        self.record: InterruptRecord | None = None
        self._signal: str | None = None
        self._trainer: pl.Trainer | None = None
        self._previous: Any = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._signal, self.record, self._trainer = None, None, trainer
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        trainer = self._trainer
        connector = getattr(trainer, "_signal_connector", None)
        if self._signal is not None or not hasattr(connector, "received_sigterm"):
            raise KeyboardInterrupt  # second Ctrl-C (or a Lightning without the flag): abort now
        self._signal = "SIGINT"
        # the flag Lightning's own SIGTERM handler sets: the loops raise SIGTERMException after the current batch
        connector.received_sigterm = True
        if trainer.is_global_zero:
            print(
                "\nlomix: Ctrl-C: stopping after the current batch and saving a checkpoint (Ctrl-C again aborts)",
                file=sys.stderr,
                flush=True,
            )

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
        self._previous, self._trainer = None, None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        record = InterruptRecord(
            self._signal or "SIGTERM", trainer.current_epoch, trainer.global_step, None, trainer.is_global_zero
        )
        if trainer.state.fn == TrainerFn.FITTING:
            path = self._folder(trainer) / self.filename
            trainer.save_checkpoint(path, weights_only=False)  # the full state: model, optimizer, loops, callbacks
            record.checkpoint = path
        self.record = record
        exception.lomix_interrupt = record  # type: ignore[attr-defined]

    def _folder(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        checkpoint = trainer.checkpoint_callback
        dirpath = getattr(checkpoint, "dirpath", None)
        return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"
