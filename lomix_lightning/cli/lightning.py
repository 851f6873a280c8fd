"""``LoMixCLI``: the LightningCLI of ``lomix fit|validate|test|predict`` (demo defaults, linked class counts)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lomix_lightning._checkpoint import read_checkpoint
from lomix_lightning.callbacks.interrupt import InterruptCheckpoint
from lomix_lightning.errors import LomixUserError

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

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, remembering the raw arguments (to tell an explicit ``--model.num_classes`` from the default)."""
        self._raw_args = (
            [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else []
        )
        for name in self._config_files():
            _check_config_file(Path(name))
        super().parse_arguments(parser, args)

    def _config_files(self) -> list[str]:
        """The ``--config`` (and ``--model``/``--data`` file) arguments of the command line, in order."""
        args = getattr(self, "_raw_args", [])
        files = [b for a, b in zip(args, args[1:]) if a in ("--config", "--model", "--data")]
        files += [a.split("=", 1)[1] for a in args if a.startswith(("--config=", "--model=", "--data="))]
        return files

    def _given_num_classes(self) -> bool:
        """Whether the command line or a config file sets the model's ``num_classes`` (else it is the default)."""
        args = getattr(self, "_raw_args", [])
        if any(re.match(r"--model\.(init_args\.)?num_classes(=|$)", a) for a in args):
            return True
        for name in self._config_files():
            path = Path(name)
            if path.is_file():
                config = yaml.safe_load(path.read_text()) or {}
                model = config.get("model", config) if isinstance(config, dict) else {}
                if isinstance(model, dict) and (
                    "num_classes" in model or "num_classes" in (model.get("init_args") or {})
                ):
                    return True
        return False

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` and take the model's hyper-parameters from it, as LightningCLI does.

        The file is read once with ``weights_only=True``; a missing, truncated, foreign or pickled file and a given
        ``num_classes`` that differs from the checkpoint's are one-line errors (LightningCLI would let the
        checkpoint's silently win).
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or (ckpt_path in ("best", "last", "hpc") and not Path(ckpt_path).exists()):
            return  # Lightning's own names: resolved by the Trainer
        hparams = dict(read_checkpoint(ckpt_path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        saved = hparams.get("num_classes")
        model = self.config[subcommand].get("model")
        given = model.get("init_args", {}).get("num_classes") if hasattr(model, "get") else None
        if isinstance(saved, int) and isinstance(given, int) and given != saved and self._given_num_classes():
            raise LomixUserError(
                f"model.num_classes={given} contradicts the checkpoint {ckpt_path!r}, trained with "
                f"num_classes={saved}; drop the option (the model's hyper-parameters come from the checkpoint) "
                f"or use a checkpoint trained with {given} classes"
            )
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def _dump_config(self) -> None:
        super()._dump_config()
        # Lightning 2.6 sets the linked in_channels into model.init_args.network.init_args of this dump and fails with
        # "Expected key ... to be in data" when a network's only arguments are linked ones (the dump then has no
        # init_args); give it an empty one
        model = self.config_dump.get("model") if isinstance(self.config_dump, dict) else None
        network = model.get("init_args", {}).get("network") if isinstance(model, dict) else None
        if isinstance(network, dict) and "class_path" in network:
            init_args = network.setdefault("init_args", {})
            # the dump leaves out the target of the link model.num_classes -> network num_classes; the module keeps
            # this dump as its hyper-parameters, from which a checkpoint rebuilds the network: write the link here
            num_classes = model["init_args"].get("num_classes")
            if isinstance(num_classes, int):
                init_args.setdefault("num_classes", num_classes)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The configured Trainer plus an :class:`InterruptCheckpoint` (SIGTERM / Ctrl-C save a checkpoint)."""
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, InterruptCheckpoint) for c in trainer.callbacks):
            trainer.callbacks.append(InterruptCheckpoint())
        return trainer

    def after_predict(self) -> None:
        """Say what was predicted and how to keep it (the CLI returns the predictions to no one)."""
        if not self.trainer.is_global_zero:
            return
        batches = self.trainer.predict_loop.predictions or []
        if batches and isinstance(batches[0], list):  # several predict dataloaders
            batches = [b for loader in batches for b in loader]
        shapes = sorted({tuple(b.shape[1:]) for b in batches if hasattr(b, "shape")})
        count = sum(int(b.shape[0]) for b in batches if hasattr(b, "shape"))
        print(
            f"\nlomix predict finished: {count} label maps of shape {', '.join(map(str, shapes)) or '-'} "
            "(add a lightning.pytorch.callbacks.BasePredictionWriter to --trainer.callbacks to save them)"
        )

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


def _check_config_file(path: Path) -> None:
    """Refuse an empty config file, or one that is not a mapping, in plain words (jsonargparse: "Unexpected config")."""
    if not path.is_file() or path.suffix.lower() not in (".yaml", ".yml", ".json"):
        return  # jsonargparse names a missing file; --model/--data may also be a class name
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return  # jsonargparse reports the syntax error with its position
    if config is None:
        raise LomixUserError(f"config file {str(path)!r} is empty (or only comments); it needs options such as "
                             "'trainer: {max_epochs: 10}'")  # fmt: skip
    if not isinstance(config, dict):
        raise LomixUserError(
            f"config file {str(path)!r} must hold a mapping of options (trainer:, model:, data:, ...), "
            f"got a {type(config).__name__}"
        )
