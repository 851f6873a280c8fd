"""``lomix export``: a checkpoint's prediction network (no LoMix parameters) as torch.export, TorchScript or weights."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lomix_lightning._checkpoint import read_checkpoint
from lomix_lightning.cli.errors import OneLineArgumentParser
from lomix_lightning.errors import LomixUserError

ExportFormat = Literal["export", "torchscript", "state_dict"]


def load_module(ckpt_path: str | Path, map_location: str = "cpu") -> nn.Module:
    """Load a :class:`~lomix_lightning.LoMixSegmentationModule` checkpoint safely (``weights_only=True``)."""
    from lomix_lightning.module import LoMixSegmentationModule

    path = Path(ckpt_path)
    read_checkpoint(path)  # a missing, truncated, foreign or pickled file: one LomixUserError naming it
    return LoMixSegmentationModule.load_from_checkpoint(path, map_location=map_location, weights_only=True)


def export_checkpoint(
    ckpt_path: str | Path,
    output: str | Path,
    fmt: ExportFormat = "export",
    input_size: int = 224,
    in_channels: int | None = None,
) -> Path:
    """Export the prediction network of a checkpoint.

    Args:
        ckpt_path: A checkpoint written by ``lomix fit`` or ``Trainer.fit``.
        output: Output file (``.pt2`` for ``export``, ``.pt`` otherwise).
        fmt: ``export`` (``torch.export``, dynamic batch size when possible), ``torchscript`` (traced) or
            ``state_dict`` (the prediction network's weights only).
        input_size: Side of the example input used to trace.
        in_channels: Input channels of the example (default: ``network.in_channels``, else 3).

    Returns:
        The written path.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise LomixUserError(f"--input_size must be a positive integer, got {input_size!r}")
    if in_channels is not None and (isinstance(in_channels, bool) or in_channels < 1):
        raise LomixUserError(f"--in_channels must be a positive integer, got {in_channels!r}")
    module = load_module(ckpt_path)
    exported = module.export_network()
    channels = in_channels or getattr(module.network, "in_channels", None) or 3
    spatial_dims = getattr(module.network, "spatial_dims", 2)  # 3-D networks (e.g. MonaiDynUNet) take a cube
    example = torch.zeros(2, channels, *[input_size] * spatial_dims)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "state_dict":
        torch.save(exported.state_dict(), output)
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(exported, example), str(output))
    elif fmt == "export":
        batch = torch.export.Dim("batch", min=1, max=1024)
        try:
            program = torch.export.export(exported, (example,), dynamic_shapes=({0: batch},))
        except Exception:  # some networks specialise the batch size; fall back to a static one
            program = torch.export.export(exported, (example,))
        torch.export.save(program, output)
    else:
        raise LomixUserError(f"unknown format {fmt!r}; allowed are 'export', 'torchscript', 'state_dict'")
    return output


def export_main(argv: Sequence[str]) -> int:
    """``lomix export --ckpt_path CKPT --output FILE [--format ...] [--input_size N]``."""
    parser = OneLineArgumentParser(prog="lomix export", description=export_checkpoint.__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="checkpoint to export")
    parser.add_argument("--output", required=True, help="output file")
    parser.add_argument("--format", default="export", choices=["export", "torchscript", "state_dict"])
    parser.add_argument("--input_size", type=int, default=224, help="side of the example input (default 224)")
    parser.add_argument("--in_channels", type=int, default=None, help="input channels (default: the network's)")
    args = parser.parse_args(list(argv))
    path = export_checkpoint(args.ckpt_path, args.output, args.format, args.input_size, args.in_channels)
    print(f"exported the prediction network ({args.format}) to {path}")
    return 0
