"""Checkpoints written before the renovation of module.py and the CLI (issue #14) still load and predict the same.

``tests/assets/pre_app_*.ckpt`` were written by the code as it was before that change (commit 1de300d):
``pre_app_cli.ckpt`` by ``lomix fit`` (hyper-parameters as the CLI stores them: ``_class_path``, ``_instantiator``,
the network as a plain config), ``pre_app_python.ckpt`` by ``Trainer.fit`` of a module built in Python. Both hold a
tiny U-Net (``base_channels=2, depth=2``: 2 maps, 3 classes) trained one step; the expected logits were read from
them with that code.
"""

from pathlib import Path

import pytest
import torch

from lomix_lightning import LoMixSegmentationModule
from lomix_lightning.cli import main

ASSETS = Path(__file__).parent / "assets"
# logits at pixel (0, 0) and their sum over the map, read with the pre-renovation code
EXPECTED = {
    "cli": ([0.7018280625343323, 0.7066383957862854, 0.6916205286979675], 520.6565551757812),
    "python": ([0.6986204385757446, 0.7089493870735168, 0.6957802176475525], 521.1921997070312),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_pre_renovation_checkpoint_loads_and_predicts_the_same(kind: str) -> None:
    path = ASSETS / f"pre_app_{kind}.ckpt"
    model = LoMixSegmentationModule.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    assert model.num_classes == 3 and model.num_outputs == 2 and model.criterion.num_maps == 6
    with torch.no_grad():
        logits = model(torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16))
    pixel, total = EXPECTED[kind]
    assert logits.shape == (1, 3, 16, 16)
    torch.testing.assert_close(logits[0, :, 0, 0], torch.tensor(pixel), rtol=1e-5, atol=1e-5)
    assert logits.sum().item() == pytest.approx(total, rel=1e-5)
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert set(model.state_dict()) == set(saved)  # every key of the old layout is still a key, and no new one


def test_pre_renovation_cli_checkpoint_tests_from_the_command_line(tmp_path: Path) -> None:
    data = [
        "--data.init_args.image_size=16",
        "--data.init_args.num_train=2",
        "--data.init_args.num_val=2",
        "--data.init_args.num_test=2",
        "--data.init_args.batch_size=2",
    ]
    args = ["test", "--ckpt_path", str(ASSETS / "pre_app_cli.ckpt"), *data, "--trainer.callbacks=[]"]
    where = [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert main([*args, *where]) == 0
