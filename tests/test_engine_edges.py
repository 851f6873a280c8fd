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


@pytest.mark.parametrize("operators", [["cat", "awf"], ["awf"], ["mul", "cat"]])
def test_pytorch_engine_gradients_of_the_dense_block_match_autograd_in_chunks(monkeypatch, operators):
    """One block for the cat/awf convolutions, chunk 0 writing the gradients, later chunks adding, an operator left
    unscored getting zero gradients: all against plain autograd through ``fuse`` and ``ce_dice_stats``."""
    from lomix_lightning import CombinatorialMutation
    from lomix_lightning import _engine as engine
    from lomix_lightning.losses.ce_dice import ce_dice_stats, ce_dice_target

    monkeypatch.setenv("LOMIX_NATIVE", "0")
    monkeypatch.setattr(engine.pytorch, "_CHUNK_BYTES", 1)  # one image per chunk: three chunks
    torch.manual_seed(0)
    mutation = CombinatorialMutation(3, 4, ["mul", "cat", "awf"])
    x = torch.randn(3, 3, 4, 5, 5, requires_grad=True)
    prepared = ce_dice_target(torch.randint(0, 4, (3, 5, 5)), 4, torch.float32)
    weights = torch.randn(3 + 4 * len(operators), 9)
    inputs = mutation.engine_inputs("pytorch", x.dtype, operators)
    got = engine.lomix_ce_dice_stats(x, operators, mutation.plan, prepared, inputs)
    got_grads = torch.autograd.grad((got * weights).sum(), [x, *mutation.parameters()], allow_unused=True)
    groups = [x] + [mutation.fuse(op, x) for op in operators]
    want = torch.cat([ce_dice_stats(g, prepared) for g in groups])
    want_grads = torch.autograd.grad((want * weights).sum(), [x, *mutation.parameters()], allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, rtol=1e-4, atol=1e-5)
