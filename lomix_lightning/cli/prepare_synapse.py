"""``lomix prepare-synapse RAW_DIR OUT_DIR``: raw Synapse CT NIfTI files to the TransUNet layout."""

from __future__ import annotations

from collections.abc import Sequence

from lomix_lightning.cli.errors import OneLineArgumentParser


def prepare_synapse_main(argv: Sequence[str]) -> int:
    """Parse the arguments and run :func:`lomix_lightning.data.prepare_synapse`."""
    from lomix_lightning.data.prepare_synapse import prepare_synapse

    parser = OneLineArgumentParser(
        prog="lomix prepare-synapse",
        description="Convert the raw Synapse abdomen CT (RawData/Training/img, label) into train_npz/, test_vol_h5/ "
        "and list files (HU clipped to [-125, 275], scaled to [0, 1]). "
        "Needs nibabel: pip install lomix-lightning[nifti]",
    )
    parser.add_argument("raw_dir", help="folder holding the raw NIfTI files")
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument(
        "--train_volumes",
        action="store_true",
        help="also write whole training volumes (train_vol_h5/) for 3-D training",
    )
    args = parser.parse_args(list(argv))
    result = prepare_synapse(args.raw_dir, args.out_dir, train_volumes=args.train_volumes)
    print(f"Synapse prepared in {args.out_dir}: {result}")
    return 0
