"""The multi-output network contract shared by every network in :mod:`lomix_lightning.models`.

A multi-output network returns ``S`` logit maps ordered coarse to fine; the last one is the prediction. The
LightningModule, the losses and the export code rely only on the members defined by :class:`MultiOutputNetwork`.
"""

from abc import ABC, abstractmethod

from torch import Tensor, nn

from lomix_lightning._config import record_init_args
from lomix_lightning.errors import LomixUserError

__all__ = ["FinalMapNetwork", "MultiOutputNetwork", "check_image_batch", "check_positive_int"]


def check_positive_int(name: str, value: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= 1 (``bool`` is rejected).

    Example:
        >>> check_positive_int("depth", 3)
        >>> check_positive_int("depth", 0)
        Traceback (most recent call last):
        ...
        lomix_lightning.errors.LomixUserError: `depth` must be a positive integer, got 0.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LomixUserError(f"`{name}` must be a positive integer, got {value!r}.")


def check_image_batch(x: Tensor, in_channels: int) -> None:
    """Raise ``ValueError`` unless ``x`` is a ``(B, in_channels, H, W)`` tensor.

    Example:
        >>> import torch
        >>> check_image_batch(torch.zeros(2, 3, 8, 8), in_channels=1)
        Traceback (most recent call last):
        ...
        lomix_lightning.errors.LomixUserError: Expected an input of shape (B, 1, H, W), got (2, 3, 8, 8).
    """
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise LomixUserError(f"Expected an input of shape (B, {in_channels}, H, W), got {tuple(x.shape)}.")


class MultiOutputNetwork(nn.Module, ABC):
    """Base class of a segmentation network with one logit map per decoder scale.

    Subclasses set ``num_outputs``, ``num_classes`` and ``in_channels`` in ``__init__`` and implement the four
    abstract methods. ``forward`` returns the same type (a list) in train and eval mode.

    Attributes:
        num_outputs: Number of logit maps ``S`` returned by :meth:`forward`.
        num_classes: Channels ``C`` of every logit map.
        in_channels: Channels of the input image.
    """

    num_outputs: int
    num_classes: int
    in_channels: int

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # remember the constructor arguments, so checkpoints rebuild the network from plain data
        record_init_args(cls)

    @abstractmethod
    def forward(self, x: Tensor) -> list[Tensor]:
        """Return ``S`` logit maps ``(B, C, h_s, w_s)``, coarse to fine, each at its native resolution."""

    @abstractmethod
    def forward_final(self, x: Tensor) -> Tensor:
        """Return only the last (finest) logit map, computing no auxiliary head."""

    @abstractmethod
    def auxiliary_heads(self) -> nn.ModuleList:
        """Return the heads that produce the ``S - 1`` auxiliary maps (everything not needed by the prediction)."""

    @abstractmethod
    def prediction_network(self) -> nn.Module:
        """Return a new module sharing the encoder, decoder and final head whose forward is :meth:`forward_final`."""


class FinalMapNetwork(nn.Module):
    """Encoder, decoder and final head of a multi-output network, without any auxiliary head.

    The submodules are shared (referenced), not copied: training the source network changes this one too.

    Args:
        encoder: Maps the image to a list of features.
        decoder: Maps the encoder's list to a list of decoder features ordered coarse to fine.
        head: Maps the last decoder feature to the logit map.

    Example:
        >>> import torch
        >>> from lomix_lightning.models import UNet
        >>> net = UNet(in_channels=1, num_classes=3, base_channels=4, depth=2)
        >>> pred = net.prediction_network()
        >>> pred(torch.zeros(1, 1, 16, 16)).shape
        torch.Size([1, 3, 16, 16])
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        """Return the final logit map ``(B, C, h, w)``."""
        return self.head(self.decoder(self.encoder(x))[-1])


class DecoderHeadsNetwork(MultiOutputNetwork):
    """A network ``encoder -> decoder -> one 1x1 head per decoder stage``, the last head giving the prediction.

    Subclasses build ``encoder`` (image -> features), ``decoder`` (features -> decoder features, coarse to fine) and
    ``heads`` (one per output, for the last ``len(heads)`` decoder features) in ``__init__``; input checks go in
    :meth:`check_input`.
    """

    encoder: nn.Module
    decoder: nn.Module
    heads: nn.ModuleList

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` on an input the network cannot take (default: wrong rank or channel count)."""
        check_image_batch(x, self.in_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return ``num_outputs`` logit maps, coarse to fine."""
        self.check_input(x)
        decoded = self.decoder(self.encoder(x))[-len(self.heads) :]
        return [head(feature) for head, feature in zip(self.heads, decoded)]

    def forward_final(self, x: Tensor) -> Tensor:
        """Return the finest logit map only."""
        self.check_input(x)
        return self.heads[-1](self.decoder(self.encoder(x))[-1])

    def auxiliary_heads(self) -> nn.ModuleList:
        """Return the ``num_outputs - 1`` heads of the coarser stages."""
        return nn.ModuleList(self.heads[:-1])

    def prediction_network(self) -> FinalMapNetwork:
        """Return encoder + decoder + final head (shared, not copied)."""
        return FinalMapNetwork(self.encoder, self.decoder, self.heads[-1])
