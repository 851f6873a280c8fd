"""Test helpers (not collected) for the network contract shared by every model in lomix_lightning.models."""

import torch
import torch.nn.functional as F


def num_params(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


def checked_prediction_network(net: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """In eval mode, ``forward_final`` and ``prediction_network()`` both give the last map; the latter is returned."""
    net.eval()
    with torch.no_grad():
        outputs = net(x)
        assert type(outputs) is list
        torch.testing.assert_close(net.forward_final(x), outputs[-1])
        pred = net.prediction_network()
        torch.testing.assert_close(pred(x), outputs[-1])
    return pred


def fit_losses(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 25) -> list[float]:
    """Cross-entropy of the last map (resized to the labels, as the loss module does) over ``steps`` Adam steps."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        logits = net(x)[-1]
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear")
        loss = F.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
