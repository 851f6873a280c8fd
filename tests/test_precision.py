"""The stand-alone losses run in float32 whatever the input dtype and autocast (as LoMixLoss does)."""

import pytest
import torch

from lomix_lightning.losses import CEDiceLoss, ce_dice_loss
from lomix_lightning.losses.structure import StructureLoss, structure_loss


def _logits(dtype, classes=9):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, classes, 224, 224, generator=gen).to(dtype)  # B*H*W = 301056 > 65504 (fp16 max)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ce_dice_loss_of_half_logits_equals_float32(dtype):
    logits = _logits(dtype).requires_grad_()
    target = torch.randint(0, 9, (6, 224, 224), generator=torch.Generator().manual_seed(1))
    loss = ce_dice_loss(logits, target)
    reference = ce_dice_loss(logits.detach().float(), target)  # the same (rounded) values in float32
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(CEDiceLoss()(logits, target), reference, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()


def test_ce_dice_loss_under_autocast_runs_in_float32():
    logits, target = _logits(torch.float32), torch.randint(0, 9, (6, 224, 224))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ce_dice_loss([logits, logits], target)
    torch.testing.assert_close(loss, ce_dice_loss([logits, logits], target), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_structure_loss_of_half_logits_equals_float32(dtype):
    logits = _logits(dtype, classes=1)
    mask = (torch.rand(6, 224, 224, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    loss = structure_loss(logits, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, structure_loss(logits.float(), mask), rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = StructureLoss()(logits.float(), mask)
    torch.testing.assert_close(autocast, structure_loss(logits.float(), mask), rtol=0, atol=0)
