"""Subset enumeration and map naming for the Combinatorial Mutation Module (paper Sec. 3.3)."""

from __future__ import annotations

import itertools

OPERATORS: tuple[str, ...] = ("add", "mul", "cat", "awf")
"""The paper's four fusion operators, in the order LoMix applies them by default."""

FAMILIES: tuple[str, ...] = ("original", *OPERATORS)
"""Operator families of the supervised maps: the network's own outputs, then one per operator."""


def enumerate_subsets(num_outputs: int) -> list[tuple[int, ...]]:
    """Every subset of ``range(num_outputs)`` with at least two members, in ``itertools.combinations`` order.

    All pairs come first, then all triples, and so on; inside one size the order is lexicographic.

    Args:
        num_outputs: The number ``L`` of maps the network returns.

    Returns:
        ``2**L - 1 - L`` tuples of 0-based indices.

    Example:
        >>> enumerate_subsets(3)
        [(0, 1), (0, 2), (1, 2), (0, 1, 2)]
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    indices = range(num_outputs)
    return [s for k in range(2, num_outputs + 1) for s in itertools.combinations(indices, k)]


def subset_name(operator: str, subset: tuple[int, ...]) -> str:
    """Name of a mutant map, 1-based and without spaces.

    Example:
        >>> subset_name("awf", (0, 1, 3))
        'awf(1,2,4)'
    """
    return f"{operator}({','.join(str(i + 1) for i in subset)})"


def map_names(num_outputs: int, operators: tuple[str, ...] | list[str]) -> list[str]:
    """Names of all supervised maps: ``P1..PL`` (coarse to fine), then each operator's subsets.

    Example:
        >>> map_names(2, ["add", "mul"])
        ['P1', 'P2', 'add(1,2)', 'mul(1,2)']
    """
    subsets = enumerate_subsets(num_outputs)
    names = [f"P{i + 1}" for i in range(num_outputs)]
    return names + [subset_name(op, s) for op in operators for s in subsets]


def map_family(name: str) -> str:
    """Operator family of a map name: ``"original"`` for ``P<i>``, else the operator key.

    Example:
        >>> map_family("P3"), map_family("mul(1,2)")
        ('original', 'mul')
    """
    if "(" in name:
        return name.split("(", 1)[0]
    return "original"


def validate_operators(operators: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Check an operator list: known keys, no duplicates. Returns it as a tuple.

    Raises:
        TypeError: If ``operators`` is a string instead of a sequence of strings.
        ValueError: If an operator is unknown or repeated.
    """
    if isinstance(operators, str):
        raise TypeError(
            f"operators must be a sequence of operator names such as ('add', 'mul'), got the string {operators!r}"
        )
    operators = tuple(operators)
    for op in operators:
        if op not in OPERATORS:
            raise ValueError(f"unknown operator {op!r}; allowed operators are {list(OPERATORS)}")
    duplicates = sorted({op for op in operators if operators.count(op) > 1})
    if duplicates:
        raise ValueError(f"operators must not repeat, got {list(operators)} (repeated: {duplicates})")
    return operators
