"""Index bookkeeping of the batched fusion kernels: subsets grouped by size, members, products of the others."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lomix_lightning.losses.subsets import enumerate_subsets


@dataclass(frozen=True)
class SizeBlock:
    """The subsets of one size, consecutive in ``itertools.combinations`` order.

    Attributes:
        size: The subset size ``s``.
        first: Position of the block's first subset among all subsets.
        count: Number of subsets of this size.
        row: First row of the block among the ``sum |S|`` (subset, member) rows.
    """

    size: int
    first: int
    count: int
    row: int


@dataclass(frozen=True)
class SubsetPlan:
    """Index bookkeeping shared by the fusion kernels (plain tuples; :meth:`index_table` makes the tensors).

    A *row* is one (subset, member) pair, subsets in order and members in order within a subset (``sum |S|`` rows).

    Attributes:
        subsets: The fused subsets, in ``itertools.combinations`` order (all pairs, then triples, ...).
        blocks: One :class:`SizeBlock` per subset size, smallest first.
        members: Per row, the member's map index.
        others: Per row, where the product of the subset's *other* members is: the other map's index for pairs, else
            the position of ``S - {member}`` within the block of size ``|S| - 1``.
        last_rows: Per subset, its last member's row (``S = S[:-1] + (S[-1],)``: the prefix is ``others`` there).
        prefix: Per subset, the position of its prefix ``S[:-1]`` in ``subsets`` (``-1`` for pairs).

    Example:
        >>> plan = SubsetPlan.build(3)
        >>> plan.subsets, plan.members, plan.others
        (((0, 1), (0, 2), (1, 2), (0, 1, 2)), (0, 1, 0, 2, 1, 2, 0, 1, 2), (1, 0, 2, 0, 2, 1, 2, 1, 0))
    """

    subsets: tuple[tuple[int, ...], ...]
    blocks: tuple[SizeBlock, ...]
    members: tuple[int, ...]
    others: tuple[int, ...]
    last_rows: tuple[int, ...]
    prefix: tuple[int, ...]

    @classmethod
    def build(cls, num_outputs: int) -> SubsetPlan:
        """The plan of every subset of ``num_outputs`` maps."""
        subsets = tuple(enumerate_subsets(num_outputs))
        blocks, first, row = [], 0, 0
        for size in range(2, num_outputs + 1):
            count = sum(len(s) == size for s in subsets)
            blocks.append(SizeBlock(size, first, count, row))
            first, row = first + count, row + count * size
        position = {s: k - blocks[len(s) - 2].first for k, s in enumerate(subsets)}  # within its size block
        members, others, last_rows = [], [], []
        for s in subsets:
            for j, i in enumerate(s):
                rest = s[:j] + s[j + 1 :]
                members.append(i)
                others.append(rest[0] if len(rest) == 1 else position[rest])
            last_rows.append(len(members) - 1)
        index = {s: k for k, s in enumerate(subsets)}
        prefix = tuple(index.get(s[:-1], -1) for s in subsets)
        return cls(subsets, tuple(blocks), tuple(members), tuple(others), tuple(last_rows), prefix)

    @property
    def num_rows(self) -> int:
        """Number of (subset, member) rows, ``sum |S|``."""
        return len(self.members)

    def index_table(self) -> Tensor:
        """``members``, ``others``, then ``members`` and ``others`` at ``last_rows``, as one int64 tensor.

        Example:
            >>> SubsetPlan.build(2).index_table().tolist()  # one pair (0, 1)
            [0, 1, 1, 0, 1, 0]
        """
        last = [self.members[r] for r in self.last_rows], [self.others[r] for r in self.last_rows]
        return torch.tensor([*self.members, *self.others, *last[0], *last[1]], dtype=torch.long)

    def member_incidence(self) -> Tensor:
        """Per size block, the ``(L, count * size)`` 0/1 matrix of row ``r``'s member, blocks flattened in turn.

        Example:
            >>> SubsetPlan.build(2).member_incidence().view(2, 2)  # rows (pair, 0) and (pair, 1)
            tensor([[1., 0.],
                    [0., 1.]])
        """
        num_maps = len(self.subsets[-1]) if self.subsets else 1
        parts = []
        for block in self.blocks:
            part = torch.zeros(num_maps, block.count * block.size)
            for r in range(block.count * block.size):
                part[self.members[block.row + r], r] = 1.0
            parts.append(part.flatten())
        return torch.cat(parts) if parts else torch.zeros(0)

    def member_rows(self, num_maps: int) -> Tensor:
        """Per row, its position ``k * L + member`` in a dense ``(K, L)`` layout (``num_maps = L``).

        Example:
            >>> SubsetPlan.build(3).member_rows(3).tolist()
            [0, 1, 3, 5, 7, 8, 9, 10, 11]
        """
        rows = [k * num_maps + i for k, s in enumerate(self.subsets) for i in s]
        return torch.tensor(rows, dtype=torch.long)
