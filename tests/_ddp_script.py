"""Test helper (not collected): several tiny DDP fits in ONE 2-process launch (CPU, gloo).

Usage: python tests/_ddp_script.py OUT_DIR
Each case writes OUT_DIR/<case>_rank<r>.pt (see _ddp_probe.RankStateDump); the non-finite "raise" case writes
OUT_DIR/raise_rank<r>.txt with the error message. Lightning's subprocess launcher re-runs this script as rank 1,
and later Trainers reuse the process group.
"""

import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).parent))

from _ddp_probe import RankStateDump, tiny_data, two_process_trainer  # noqa: E402

from lomix_lightning import LoMixSegmentationModule  # noqa: E402
from lomix_lightning.models import UNet  # noqa: E402

CASES = {
    "last_layer": {"supervision": "last_layer"},
    "deep_supervision": {"supervision": "deep_supervision"},
    "mutation": {"supervision": "mutation"},
    "lomix": {"supervision": "lomix"},
    "lomix_mul": {"supervision": "lomix", "operators": ["mul"]},
    "lomix_cat_awf": {"supervision": "lomix", "operators": ["cat", "awf"]},
    "learned_deep_supervision": {"supervision": "deep_supervision", "weighting": "learned"},
    "aligned": {"supervision": "lomix", "weighting": "aligned"},
    "uncertainty": {"supervision": "lomix", "weighting": "uncertainty"},
    "skip_nonfinite": {"supervision": "lomix", "nonfinite_loss": "skip"},
    "raise_nonfinite": {"supervision": "lomix", "nonfinite_loss": "raise"},  # last: it ends with an error
}


class NaNOnRankOne(LoMixSegmentationModule):
    """Poisons the coarsest map of the first batch on rank 1 only."""

    poison = False

    def training_step(self, batch, batch_idx):
        self.poison = self.global_rank == 1 and batch_idx == 0
        return super().training_step(batch, batch_idx)

    def _network_outputs(self, image, size):
        outputs = super()._network_outputs(image, size)
        if self.poison:
            outputs[0] = outputs[0] * float("nan")
        return outputs


def run(name: str, out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    kwargs = dict(CASES[name])
    cls = NaNOnRankOne if "nonfinite" in name else LoMixSegmentationModule
    model = cls(UNet(in_channels=1, num_classes=3, base_channels=4, depth=3), 3, hd95=False, **kwargs)
    trainer = two_process_trainer(out, "ddp", 1, [RankStateDump(out, prefix=f"{name}_")])
    trainer.fit(model, tiny_data())


def main(out: Path) -> None:
    for name in CASES:
        try:
            run(name, out)
        except FloatingPointError as error:
            (out / f"{name}_rank{os.environ.get('LOCAL_RANK', '0')}.txt").write_text(str(error))
            return


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    main(Path(sys.argv[1]))
