"""LoMixSegmentationModule: training, prediction, export, checkpoints, optimiser groups and errors."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lomix_lightning import LoMixSegmentationModule
from lomix_lightning.data import SyntheticShapesDataModule
from lomix_lightning.inference import count_parameters
from lomix_lightning.models import UNet


def _data(**kwargs):
    args = dict(num_classes=3, image_size=32, num_train=16, num_val=8, num_test=8, batch_size=8)
    args.update(kwargs)
    return SyntheticShapesDataModule(**args)


def _net(num_classes=3, in_channels=1):
    return UNet(in_channels=in_channels, num_classes=num_classes, base_channels=4, depth=3)


def _trainer(tmp_path, **kwargs):
    args = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=1,
    )
    args.update(kwargs)
    return pl.Trainer(**args)


class SingleMapNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class TwoMapNet(nn.Module):
    """A network without a num_outputs attribute: the module finds the count with a dry run."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 4, 3, padding=1)
        self.coarse = nn.Conv2d(4, 3, 1)
        self.fine = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return [self.coarse(F.avg_pool2d(h, 2)), self.fine(h)]


def test_fit_test_predict_and_logged_keys(tmp_path):
    model = LoMixSegmentationModule(_net(), 3, class_names=["background", "blob", "lines"])
    trainer = _trainer(tmp_path, max_epochs=2)
    alpha_before = model.criterion.weighting.alpha.detach().clone()
    trainer.fit(model, _data())
    assert torch.all(model.criterion.weighting.alpha < alpha_before)  # weights only shrink (see README)
    for key in (
        "train/loss_epoch",
        "train/loss_original",
        "train/loss_mutant",
        "val/dice",
        "val/dice/blob",
        "val/hd95",
    ):
        assert key in trainer.callback_metrics, key
    results = trainer.test(model, _data(), verbose=False)[0]
    for key in ("test/dice", "test/dice/lines", "test/hd95/blob", "test/iou", "test/miou"):
        assert key in results and math.isfinite(results[key]), key
    masks = trainer.predict(model, _data())
    assert masks[0].shape == (8, 32, 32) and masks[0].dtype == torch.long
    assert model.example_input_array.shape == (1, 1, 32, 32)


@pytest.mark.parametrize("mode", ["last", "sum"])
def test_forward_is_the_prediction_only(mode):
    net = _net()
    model = LoMixSegmentationModule(net, 3, inference_output=mode)
    x = torch.randn(2, 1, 32, 32)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            outputs = [F.interpolate(o, size=(32, 32), mode="bilinear", align_corners=False) for o in net(x)]
        expected = outputs[-1] if mode == "last" else sum(outputs)
        got = model(x)
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["last", "sum"])
def test_export_network_matches_forward_and_drops_training_parameters(mode):
    net = _net()
    model = LoMixSegmentationModule(net, 3, inference_output=mode).eval()
    exported = model.export_network()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(exported(x), model(x))
    aux = sum(p.numel() for head in net.auxiliary_heads() for p in head.parameters())
    expected = count_parameters(net) - (aux if mode == "last" else 0)
    assert count_parameters(exported) == expected
    names = [n for n, _ in exported.named_parameters()]
    assert not any("alpha" in n or "criterion" in n or ".cat." in n or ".awf." in n for n in names)
    assert not any(p.data_ptr() == q.data_ptr() for p in exported.parameters() for q in net.parameters())  # a copy


def test_checkpoint_round_trip_restores_alpha_exactly(tmp_path):
    model = LoMixSegmentationModule(_net(), 3, loss_weight_lr=0.05)
    trainer = _trainer(tmp_path)
    trainer.fit(model, _data())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # plain data only: no pickled code
    assert checkpoint["hyper_parameters"]["network"]["class_path"] == "lomix_lightning.models.unet.UNet"
    loaded = LoMixSegmentationModule.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(loaded.criterion.weighting.alpha, model.criterion.weighting.alpha)
    assert not torch.equal(loaded.criterion.weighting.alpha, torch.zeros_like(loaded.criterion.weighting.alpha))
    x = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


def test_checkpoint_from_other_num_classes_fails_clearly(tmp_path):
    model = LoMixSegmentationModule(_net(3), 3)
    trainer = _trainer(tmp_path, max_epochs=0)
    trainer.fit(model, _data())
    path = tmp_path / "three.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match="num_classes=5 but the network predicts 3 classes"):
        LoMixSegmentationModule.load_from_checkpoint(path, num_classes=5, weights_only=True)


def test_single_tensor_network():
    model = LoMixSegmentationModule(SingleMapNet(), 3, supervision="last_layer", num_outputs=1)
    batch = {"image": torch.randn(2, 1, 16, 16), "mask": torch.randint(0, 3, (2, 16, 16))}
    loss = model.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="single map but supervision='lomix' needs several"):
        LoMixSegmentationModule(SingleMapNet(), 3, num_outputs=1)


class DataDependentNet(TwoMapNet):
    """A network the meta device cannot run (it reads a value): its maps are counted on a batch in setup."""

    def forward(self, x):
        if float(x.mean()) > 1e9:
            raise AssertionError("unreachable")
        return super().forward(x)


def test_number_of_outputs_from_a_meta_dry_run_in_init():
    model = LoMixSegmentationModule(TwoMapNet(), 3)  # no num_outputs attribute: counted on the meta device
    assert model.num_outputs == 2 and model.hparams.num_outputs == 2
    assert model.criterion.num_maps == 2 + 4 * 1
    assert all(p.device.type == "cpu" for p in model.parameters())  # the dry run left the real weights alone


def test_number_of_outputs_from_a_dry_run(tmp_path):
    model = LoMixSegmentationModule(DataDependentNet(), 3)
    assert model.criterion is None
    trainer = _trainer(tmp_path)
    trainer.fit(model, _data(in_channels=1))
    assert model.num_outputs == 2 and model.hparams.num_outputs == 2
    assert model.criterion.num_maps == 2 + 4 * 1
    assert any(p is model.criterion.weighting.alpha for g in trainer.optimizers[0].param_groups for p in g["params"])


def test_mismatching_output_count_is_an_error():
    model = LoMixSegmentationModule(TwoMapNet(), 3, num_outputs=3)
    batch = {"image": torch.randn(2, 1, 16, 16), "mask": torch.randint(0, 3, (2, 16, 16))}
    with pytest.raises(ValueError, match="returned 2 maps but num_outputs=3"):
        model.training_step(batch, 0)


def test_param_groups_hold_the_loss_weights():
    model = LoMixSegmentationModule(_net(), 3, loss_weight_lr=1e-2, loss_weight_decay=0.0)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    network_group, weight_group = optimizer.param_groups
    assert network_group["lr"] == 1e-4 and network_group["weight_decay"] == 1e-4
    assert weight_group["name"] == "loss_weights" and weight_group["lr"] == 1e-2 and weight_group["weight_decay"] == 0
    assert weight_group["params"] == [model.criterion.weighting.alpha]
    fusion = {id(p) for n, p in model.criterion.named_parameters() if "alpha" not in n}
    assert fusion <= {id(p) for p in network_group["params"]}
    fixed = LoMixSegmentationModule(_net(), 3, supervision="mutation").configure_optimizers()
    assert len(fixed.param_groups) == 1


def test_optimizer_and_scheduler_factories():
    model = LoMixSegmentationModule(
        _net(),
        3,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1),
    )
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD)
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert "optimizer" not in model.hparams  # callables are not stored: checkpoints stay plain data


def test_binary_structure_loss_and_sum_inference(tmp_path):
    model = LoMixSegmentationModule(
        _net(num_classes=1), 1, loss="structure", inference_output="sum", class_names=["polyp"]
    )
    data = _data(num_classes=2)
    trainer = _trainer(tmp_path)
    trainer.fit(model, data)
    assert "val/dice/polyp" in trainer.callback_metrics
    assert model.predict_step({"image": torch.randn(2, 1, 32, 32)}, 0).unique().tolist() in ([0], [1], [0, 1])


def test_bad_input_errors():
    model = LoMixSegmentationModule(_net(), 3)
    with pytest.raises(ValueError, match="images have 3 channels but the network expects in_channels=1"):
        model.training_step({"image": torch.randn(2, 3, 16, 16), "mask": torch.zeros(2, 16, 16).long()}, 0)
    with pytest.raises(ValueError, match="labels \\[7\\] outside \\[0, 3\\)"):
        model.training_step({"image": torch.randn(2, 1, 16, 16), "mask": torch.full((2, 16, 16), 7)}, 0)
    with pytest.raises(ValueError, match="batches must be dicts with 'image'"):
        model.training_step((torch.randn(2, 1, 16, 16), torch.zeros(2, 16, 16)), 0)
    with pytest.raises(ValueError, match="class_names has 2 entries but num_classes=3"):
        LoMixSegmentationModule(_net(), 3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="num_classes=4 but the network predicts 3"):
        LoMixSegmentationModule(_net(), 4)
    bad = LoMixSegmentationModule(_net(), 3)
    bad.network.forward = lambda x: {"out": x}
    batch = {"image": torch.randn(2, 1, 16, 16), "mask": torch.zeros(2, 16, 16).long()}
    with pytest.raises(TypeError, match="must return a Tensor or a list/tuple of Tensors"):
        bad.training_step(batch, 0)


def test_nonfinite_loss_raise_and_skip():
    model = LoMixSegmentationModule(_net(), 3)
    with torch.no_grad():
        model.network.heads[0].bias.fill_(float("nan"))
    batch = {"image": torch.randn(2, 1, 16, 16), "mask": torch.zeros(2, 16, 16).long()}
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0 .* in maps \\['P1', 'add\\(1,2\\)'"):
        model.training_step(batch, 0)
    skipping = LoMixSegmentationModule(_net(), 3, nonfinite_loss="skip")
    with torch.no_grad():
        skipping.network.heads[0].bias.fill_(float("nan"))
    with pytest.warns(UserWarning, match="batch skipped"):
        assert skipping.training_step(batch, 0) is None
    assert skipping.skipped_batches == 1
