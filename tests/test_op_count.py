"""The GPU path without a GPU: operators (about one kernel launch each) and host reads counted on ``meta`` / CPU.

The ``meta`` device has no data but takes the same branches as CUDA here (no compiled CPU kernels, the whole
batch in one chunk), so the counts are those a CUDA run launches.
"""

import pytest
import torch

from lomix_lightning import LoMixLoss
from lomix_lightning.profiling import OpCounter


def _count(scheme, memory_efficient=False, device="meta", check_target=False, batch=6, classes=9, size=224):
    loss = LoMixLoss(4, classes, scheme, check_target=check_target, memory_efficient=memory_efficient).to(device)
    maps = [torch.randn(batch, classes, size // f, size // f, device=device, requires_grad=True) for f in (8, 4, 2, 1)]
    target = torch.randint(0, classes, (batch, size, size), device=device)
    with OpCounter() as counter:
        loss(maps, target).total.backward()
    return counter


def test_lomix_operator_count_against_deep_supervision():
    deep = _count("deep_supervision")
    lomix, lean = _count("lomix"), _count("lomix", memory_efficient=True)
    assert deep.num_syncs == lomix.num_syncs == lean.num_syncs == 0
    assert 60 <= deep.total <= 100
    # issue #18 asked for <= 2.5x (it was 5.77x, 30.8x with memory_efficient, before the per-size kernels and the
    # merged passes); reached: 2.49x (202 / 81) with two CE + Dice passes, 9.68x (784) with memory_efficient (one
    # pass per group, chunks of images); these bounds stop regressions
    assert lomix.total / deep.total <= 2.5
    assert lean.total / deep.total <= 9.7


def test_the_label_check_is_the_only_host_read_of_the_loss():
    assert _count("lomix", device="cpu", check_target=True, batch=1, size=32).syncs == {"_local_scalar_dense": 1}
    assert _count("lomix", device="cpu", check_target=False, batch=1, size=32).num_syncs == 0


@pytest.mark.parametrize("scheme", ["last_layer", "mutation"])
def test_no_host_read_on_meta(scheme):
    assert _count(scheme).num_syncs == 0
