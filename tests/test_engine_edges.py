"""Inputs at the edges of the loss engines, the same on both (issue #13 item 4, issue #17 item 7)."""

import pytest
import torch

from lomix_lightning import LoMixLoss


def test_a_strided_target_with_ignore_index_equals_its_contiguous_copy(loss_engine, device):
    gen = torch.Generator().manual_seed(0)
    loss = LoMixLoss(2, 3, ignore_index=255).to(device)
    outputs = [torch.randn(1, 3, 4, 4, generator=gen).to(device), torch.randn(1, 3, 8, 8, generator=gen).to(device)]
    target = torch.randint(0, 3, (1, 8, 8), generator=gen)
    target[0, 0] = 255
    strided = target.to(device).transpose(1, 2)  # the repro: the PyTorch engine crashed on .view
    assert not strided.is_contiguous()
    torch.testing.assert_close(loss(outputs, strided).total, loss(outputs, strided.contiguous()).total)


def test_outputs_and_target_on_different_devices_are_named(loss_engine, device):
    outputs = [torch.randn(1, 3, 4, 4, device=device), torch.randn(1, 3, 8, 8, device=device)]
    target = torch.zeros(1, 8, 8, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=f"the outputs are on {device} but the target is on meta"):
        LoMixLoss(2, 3)(outputs, target)
    with pytest.raises(ValueError, match=f"different devices \\(P1 on meta, P2 on {device}\\)"):
        LoMixLoss(2, 3)([outputs[0].to("meta"), outputs[1]], torch.zeros(1, 8, 8, dtype=torch.long, device=device))


@pytest.mark.parametrize("scheme", ["last_layer", "lomix"])
def test_an_empty_batch_is_refused_by_both_engines_alike(loss_engine, device, scheme):
    outputs = [torch.randn(0, 3, 4, 4, device=device), torch.randn(0, 3, 8, 8, device=device)]
    with pytest.raises(
        ValueError, match=r"the batch is empty: the outputs have batch size 0 \(P1 shape \(0, 3, 4, 4\)\)"
    ):
        LoMixLoss(2, 3, scheme)(outputs, torch.zeros(0, 8, 8, dtype=torch.long, device=device))


def test_a_target_that_is_not_a_tensor_is_a_type_error():
    with pytest.raises(TypeError, match="target must be a Tensor of class indices, got list"):
        LoMixLoss(2, 3)([torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8)], [[0]])
