"""Gradient-aligned weighting: each map's weight follows how well its gradient agrees with the main objective's.

With the total ``sum_u w_u L_u(theta)``, one SGD step of size ``eta`` changes the main loss (the map used at
inference) by about ``-eta * sum_u w_u <g_main, g_u>``: a map helps the main objective when its gradient agrees with
``g_main`` and hurts it when it conflicts (Du et al. 2018; Lin et al. 2019). All ``M`` inner products come from one
directional derivative of every per-map loss along ``g_main``, here a central finite difference: two forward passes
at ``theta +- h * g_main / |g_main|`` (run with :func:`torch.func.functional_call` on perturbed copies, so no
parameter, buffer, RNG state or ``.grad`` of the network changes) plus one backward of the main loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lomix_lightning.losses.weighting_base import LossWeighting

ProbeLosses = Callable[[Any], tuple[Tensor, Tensor]]
"""``raw network output -> (main loss (), per-map losses (M,))``, unweighted."""

Reduce = Callable[[Tensor], Tensor]
"""Sum of a tensor over all processes (identity on one process)."""


def alignment_from_probe(inner: Tensor, main_sq_norm: Tensor) -> Tensor:
    """Normalised alignment ``<g_u, g_main> / |g_main|^2``, clipped to ``[-1, 1]``; 0 where ``g_main`` vanishes.

    The ratio is the projection coefficient of ``g_u`` on ``g_main``: the main map itself scores 1, a map pulling
    the other way scores below 0. It does not change with the learning rate or a common scale of the losses.

    Args:
        inner: ``(M,)`` inner products ``<g_u, g_main>`` (summed over processes).
        main_sq_norm: ``()`` ``|g_main|^2`` (summed over the same processes).

    Example:
        >>> alignment_from_probe(torch.tensor([4.0, 1.0, 0.0, -8.0]), torch.tensor(4.0))
        tensor([ 1.0000,  0.2500,  0.0000, -1.0000])
    """
    if float(main_sq_norm) <= 0.0:
        return torch.zeros_like(inner)
    return (inner / main_sq_norm).clamp(-1.0, 1.0)


def aligned_weights(state: Tensor, base: float) -> Tensor:
    """``w = base * (1 + s)`` for the running alignment ``s`` in ``[-1, 1]``: weights in ``[0, 2 * base]``.

    With ``s = 0`` at the start every weight is ``base`` (``ln 2``: the paper's start), a map whose gradient always
    agrees with the main one tends to ``2 * base`` and one that always conflicts to 0.

    Example:
        >>> aligned_weights(torch.tensor([1.0, 0.0, -1.0]), 0.5)
        tensor([1.0000, 0.5000, 0.0000])
    """
    return base * (1.0 + state)


@contextmanager
def _probe_context(device: torch.device) -> Iterator[None]:
    """Full precision (no autocast) and a forked RNG, so dropout draws in the probe leave no trace."""
    devices = [device] if device.type == "cuda" else []
    autocast_off = torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else nullcontext()
    with torch.random.fork_rng(devices=devices), autocast_off:
        yield


class AlignedWeighting(LossWeighting):
    """Per-map weights from the alignment of each map's gradient with the main objective's (beyond the paper).

    Every ``every`` training steps, :meth:`maybe_probe` measures ``a_u = <g_u, g_main> / |g_main|^2`` (clipped to
    ``[-1, 1]``) for all ``M`` maps at once, where ``g`` are gradients with respect to the network's parameters and
    ``main`` is the map used at inference; the running alignment ``s <- momentum * s + (1 - momentum) * a`` sets the
    weights ``w_u = ln 2 * (1 + s_u)``: non-negative, at most ``2 ln 2``, ``ln 2`` at the start like the paper's
    learned weights (so learning rates carry over). The weights are no parameters: no optimizer moves them.
    Weights, running alignment, last alignment and the step counter are buffers, so checkpoints resume them; under
    DDP the probe's numbers are summed over processes, so every rank holds the same weights.

    Args:
        num_maps: Number ``M`` of supervised maps.
        every: Probe every this many calls of :meth:`maybe_probe` (training steps, micro-batches under gradient
            accumulation); the first call probes.
        momentum: Running-average factor of the alignment per probe, in ``[0, 1)``.
        probe_step: Length ``h`` of the finite-difference step along ``g_main / |g_main|``, relative to the norm
            of the network's parameters.
        base: The weight of a map with zero running alignment (and of every map at the start).

    Raises:
        ValueError: On ``every < 1``, ``momentum`` outside ``[0, 1)``, ``probe_step <= 0`` or ``base <= 0``.

    Example:
        >>> weighting = AlignedWeighting(3)
        >>> weighting()
        tensor([0.6931, 0.6931, 0.6931])
        >>> net = nn.Linear(2, 1, bias=False)
        >>> _ = nn.init.zeros_(net.weight)
        >>> def losses(out):  # main, aligned, conflicting
        ...     main = (out - 1).pow(2).mean()
        ...     return main, torch.stack([main, 2 * main, (out + 1).pow(2).mean()])
        >>> weighting.maybe_probe(net, torch.ones(4, 2), losses)
        True
        >>> weighting.alignment.round(decimals=3)
        tensor([ 1.,  1., -1.])
        >>> weighting().round(decimals=4)  # ln 2 * (1 + 0.1 * alignment) after one probe
        tensor([0.7625, 0.7625, 0.6238])
    """

    learnable = True  # the weights move during training (from probes, not from an optimizer)

    def __init__(
        self,
        num_maps: int,
        every: int = 10,
        momentum: float = 0.9,
        probe_step: float = 1e-4,
        base: float = math.log(2.0),
    ) -> None:
        super().__init__(num_maps)
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if not probe_step > 0.0:
            raise ValueError(f"probe_step must be > 0, got {probe_step!r}")
        if not base > 0.0:
            raise ValueError(f"base must be > 0, got {base!r}")
        self.every, self.momentum, self.probe_step, self.base = every, float(momentum), float(probe_step), float(base)
        self.register_buffer("state", torch.zeros(num_maps))  # running alignment s, in [-1, 1]
        self.register_buffer("alignment", torch.zeros(num_maps))  # the last probe's a
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # calls of maybe_probe
        self.register_buffer("probes", torch.zeros((), dtype=torch.long))  # probes that updated the state
        self._host_steps: int | None = None  # ``steps`` on the host: read once, so a step without probe reads nothing
        self._host_probes: int | None = 0  # ``probes`` on the host, for loggers that look every step

    def forward(self) -> Tensor:
        """The ``(M,)`` weights ``base * (1 + s)``."""
        return aligned_weights(self.state, self.base)

    def maybe_probe(self, network: nn.Module, inputs: Any, losses: ProbeLosses, reduce: Reduce | None = None) -> bool:
        """Count a training step and, every ``every`` steps, probe the alignment and update the weights.

        Args:
            network: The network (unwrapped: not the DDP wrapper); called as ``network(inputs)``.
            inputs: Its input batch.
            losses: ``raw output -> (main loss, (M,) per-map losses)``, unweighted, in map order.
            reduce: Sum over processes (DDP); ``None`` on one process.

        Returns:
            Whether this call probed and updated the weights (every rank returns the same).

        Raises:
            ValueError: If ``losses`` returns other than a scalar and ``M`` losses.
        """
        step = int(self.steps) if self._host_steps is None else self._host_steps
        self._host_steps = step + 1
        self.steps += 1
        if step % self.every != 0:
            return False
        inner, main_sq = self.probe(network, inputs, losses)
        numbers = torch.cat([inner, main_sq.reshape(1)]).to(self.state.device, torch.float64)
        if reduce is not None:
            numbers = reduce(numbers)
        if not bool(torch.isfinite(numbers).all()):  # the same on every rank after the reduce: all skip alike
            return False
        alignment = alignment_from_probe(numbers[:-1], numbers[-1]).to(self.state.dtype)
        self.alignment.copy_(alignment)
        self.state.mul_(self.momentum).add_((1.0 - self.momentum) * alignment)
        count = self.probe_count
        self.probes += 1
        self._host_probes = count + 1
        return True

    @property
    def probe_count(self) -> int:
        """How many probes updated the weights (``probes`` read from the device once after loading, then counted)."""
        if self._host_probes is None:
            self._host_probes = int(self.probes)
        return self._host_probes

    def probe(self, network: nn.Module, inputs: Any, losses: ProbeLosses) -> tuple[Tensor, Tensor]:
        """``(M,)`` inner products ``<g_u, g_main>`` and ``|g_main|^2`` on this process's batch.

        One forward and backward of the main loss for ``g_main`` (``torch.autograd.grad``: no ``.grad`` is
        written), then the directional derivative of every per-map loss along ``g_main / |g_main|`` by a central
        difference of two forwards. The forwards run in full precision on copies of the buffers (BatchNorm
        statistics) with one RNG state each (the same dropout masks), which is then restored.
        """
        named = [(name, p) for name, p in network.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the network has no trainable parameter to probe")
        names = [name for name, _ in named]
        params = [p for _, p in named]
        buffers = dict(network.named_buffers())
        device = params[0].device
        with _probe_context(device):
            rng = _rng_state(device)
            main, per_map = self._call(network, {**dict(named), **_copies(buffers)}, inputs, losses)
            grads = torch.autograd.grad(main, params, allow_unused=True)
            with torch.no_grad():
                grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
                norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
                # no early return: every rank runs both forwards (SyncBatchNorm); g = 0 moves nothing and gives 0,
                # a non-finite norm gives non-finite numbers, which every rank skips alike after the reduce
                safe = torch.where(norm > 0, norm, torch.ones_like(norm))
                scale = torch.sqrt(sum(p.detach().double().pow(2).sum() for p in params))
                h = self.probe_step * max(float(scale), 1.0)
                diffs = []
                for sign in (1.0, -1.0):
                    _set_rng_state(device, rng)
                    moved = {n: p.detach() + (sign * h / safe).to(p.dtype) * g for n, p, g in zip(names, params, grads)}
                    diffs.append(self._call(network, {**moved, **_copies(buffers)}, inputs, losses)[1].double())
                directional = (diffs[0] - diffs[1]) / (2.0 * h)  # <g_u, g_main / |g_main|>
        return directional * norm, norm.pow(2)

    def _call(
        self, network: nn.Module, state: dict[str, Tensor], inputs: Any, losses: ProbeLosses
    ) -> tuple[Tensor, Tensor]:
        main, per_map = losses(functional_call(network, state, (inputs,)))
        if main.numel() != 1 or tuple(per_map.shape) != (self.num_maps,):
            raise ValueError(
                f"the probe's losses must be a scalar main loss and ({self.num_maps},) per-map losses, got shapes "
                f"{tuple(main.shape)} and {tuple(per_map.shape)}"
            )
        return main.reshape(()), per_map

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_steps = self._host_probes = None  # loaded counters are read again at their next use

    def extra_repr(self) -> str:
        """Summary shown in ``print(module)``."""
        return f"num_maps={self.num_maps}, every={self.every}, momentum={self.momentum}, probe_step={self.probe_step}"


def _copies(buffers: dict[str, Tensor]) -> dict[str, Tensor]:
    """Clones of the buffers: a forward in training mode updates the copies (BatchNorm), not the network's."""
    return {name: b.clone() for name, b in buffers.items()}


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
