"""The ``lomix`` command: LightningCLI (fit, validate, test, predict) plus export, prepare-synapse and compare."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pickle import UnpicklingError
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lomix_lightning._cli_errors import summarize_error
from lomix_lightning._interrupt import EXIT_CODES, InterruptCheckpoint

DEMO_MODEL: dict[str, Any] = {
    "class_path": "lomix_lightning.LoMixSegmentationModule",
    "init_args": {
        "num_classes": 4,
        "network": {
            "class_path": "lomix_lightning.models.UNet",
            "init_args": {"base_channels": 16, "depth": 4},
        },
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.002, "weight_decay": 0.0001}},
    },
}
DEMO_DATA: dict[str, Any] = {"class_path": "lomix_lightning.data.SyntheticShapesDataModule"}
DEFAULT_CALLBACKS: list[dict[str, Any]] = [
    {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
    {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"monitor": "val/dice", "mode": "max", "filename": "best-{epoch:03d}"},
    },
    # Lightning 2.6 writes save_last only when a top-k checkpoint is written; this one rewrites last.ckpt every epoch
    {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"filename": "last", "enable_version_counter": False},
    },
    {"class_path": "lomix_lightning.callbacks.WeightTrajectoryLogger"},
    {"class_path": "lomix_lightning.callbacks.BestEpochWeightBarChart", "init_args": {"monitor": "val/dice"}},
]
DEFAULT_LOGGER: dict[str, Any] = {
    "class_path": "lightning.pytorch.loggers.CSVLogger",
    "init_args": {"save_dir": "lomix_runs", "name": "demo"},
}


class LoMixCLI(LightningCLI):
    """LightningCLI for LoMix: the demo by default, class counts linked from ``--model.num_classes``.

    ``--model.num_classes`` also sets the network's and the datamodule's ``num_classes``; the network's
    ``in_channels`` and the module's ``class_names`` follow the datamodule. Subclasses of the module and any
    LightningDataModule can be passed by ``class_path``.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_kwargs", {"prog": "lomix"})
        # the optimizer is the module's own argument (--model.init_args.optimizer): a top-level --optimizer would
        # replace configure_optimizers and silently drop the loss-weight parameter group
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link class counts and channels, and set the demo defaults."""
        parser.link_arguments("model.init_args.num_classes", "model.init_args.network.init_args.num_classes")
        parser.link_arguments("model.init_args.num_classes", "data.init_args.num_classes")
        parser.link_arguments(
            "data.in_channels", "model.init_args.network.init_args.in_channels", apply_on="instantiate"
        )
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
        parser.set_defaults(
            {
                "model": DEMO_MODEL,
                "data": DEMO_DATA,
                "trainer.max_epochs": 12,
                "trainer.default_root_dir": "lomix_runs",
                "trainer.callbacks": DEFAULT_CALLBACKS,
                "trainer.logger": DEFAULT_LOGGER,
                "trainer.log_every_n_steps": 5,
            }
        )

    def _dump_config(self) -> None:
        super()._dump_config()
        # Lightning 2.6 sets the linked in_channels into model.init_args.network.init_args of this dump and fails with
        # "Expected key ... to be in data" when a network's only arguments are linked ones (the dump then has no
        # init_args); give it an empty one
        model = self.config_dump.get("model") if isinstance(self.config_dump, dict) else None
        network = model.get("init_args", {}).get("network") if isinstance(model, dict) else None
        if isinstance(network, dict) and "class_path" in network:
            network.setdefault("init_args", {})

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The configured Trainer plus an :class:`InterruptCheckpoint` (SIGTERM / Ctrl-C save a checkpoint)."""
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, InterruptCheckpoint) for c in trainer.callbacks):
            trainer.callbacks.append(InterruptCheckpoint())
        return trainer

    def after_fit(self) -> None:
        """Tell the user where the checkpoints, logs and plots went."""
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        if not trainer.is_global_zero:
            return
        lines = []
        for checkpoint in trainer.checkpoint_callbacks:
            kind = f"best ({checkpoint.monitor})" if checkpoint.monitor else "latest"
            if checkpoint.best_model_path:
                lines.append(f"{kind} checkpoint: {checkpoint.best_model_path}")
        lines.append(f"logs: {log_dir or trainer.default_root_dir}")
        from lomix_lightning.callbacks import BestEpochWeightBarChart, WeightTrajectoryLogger
        from lomix_lightning.callbacks._weights import output_dir

        weight_callbacks = (WeightTrajectoryLogger, BestEpochWeightBarChart)
        plots = {str(output_dir(trainer, c.dirpath)) for c in trainer.callbacks if isinstance(c, weight_callbacks)}
        lines.extend(f"LoMix weight plots and CSV: {path}" for path in sorted(plots))
        print("\n".join(["", "lomix fit finished.", *lines]))


_HINTS = (("but got num_samples=0", "a shuffled DataLoader got an empty dataset"),)
"""Plain-words context for cryptic messages from dependencies: (text in the message, what it means)."""


def _with_hint(message: str) -> str:
    hint = next((hint for needle, hint in _HINTS if needle in message), None)
    return f"{hint} ({message})" if hint else message


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def _error(message: str, code: int = 2, label: str = "error") -> int:
    rank = _rank()
    where = f"lomix (rank {rank})" if rank else "lomix"
    print(f"{where}: {label}: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _interrupted(error: SIGTERMException) -> int:
    record = getattr(error, "lomix_interrupt", None)
    if record is None:
        return _error("interrupted (SIGTERM)", EXIT_CODES["SIGTERM"], "stopped")
    if not record.is_global_zero:
        return record.exit_code
    print(f"lomix: {record.message()}", file=sys.stderr)
    return record.exit_code


def _run_cli(args: list[str]) -> None:
    with warnings.catch_warnings():  # main() hands over sys.argv itself: that is no mistake
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        LoMixCLI(args=args, parser_kwargs={"prog": "lomix", "exit_on_error": False})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lomix`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else None
    try:
        if command == "export":
            from lomix_lightning.cli_export import export_main

            return export_main(args[1:])
        if command == "prepare-synapse":
            from lomix_lightning.cli_prepare import prepare_synapse_main

            return prepare_synapse_main(args[1:])
        if command == "compare":
            from lomix_lightning.compare import compare_main

            return compare_main(args[1:])
        if not args or args[0].startswith("-") and args[0] not in ("-h", "--help", "--version"):
            args = ["fit", *args]  # `lomix` alone trains the demo
        _run_cli(args)
    except SIGTERMException as error:  # SIGTERM, or a first Ctrl-C during fit (InterruptCheckpoint)
        return _interrupted(error)
    except SystemExit as error:
        if isinstance(error.__context__, KeyboardInterrupt):  # Lightning exits 1 on a KeyboardInterrupt
            return _aborted()
        raise
    except KeyboardInterrupt:
        return _aborted()
    except ArgumentError as error:
        return _error(summarize_error(str(error)))
    except (ValueError, MisconfigurationException) as error:
        return _error(_with_hint(summarize_error(str(error))))
    except UnpicklingError as error:  # torch.load(weights_only=True) met a pickled object, or no checkpoint at all
        return _error(_unpickling_reason(str(error)))
    except (TypeError, FileNotFoundError, ImportError, FloatingPointError) as error:
        return _error(f"{type(error).__name__}: {summarize_error(str(error))}")
    return 0


def _unpickling_reason(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    unsafe = next((line for line in lines if "Unsupported global" in line), None)
    if unsafe is not None:
        return f"the checkpoint holds pickled code, refused by torch.load(weights_only=True): {unsafe}"
    after = [line for line in lines if not line.startswith(("Weights only load failed", "Please file", "Check the"))]
    return f"not a readable PyTorch checkpoint (damaged, or another format): {' '.join(after or lines[:1])}"


def _aborted() -> int:
    return _error("aborted by Ctrl-C; the last epoch checkpoint (if any) is in the run directory", 130, "stopped")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
