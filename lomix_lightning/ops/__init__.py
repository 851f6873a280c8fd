"""Fusion operators and subset enumeration of the Combinatorial Mutation Module."""

from lomix_lightning.ops.fusion import add_fusion, awf_fusion, cat_fusion, mul_fusion
from lomix_lightning.ops.subsets import (
    FAMILIES,
    OPERATORS,
    enumerate_subsets,
    map_family,
    map_names,
    subset_name,
    validate_operators,
)

__all__ = [
    "FAMILIES",
    "OPERATORS",
    "add_fusion",
    "awf_fusion",
    "cat_fusion",
    "enumerate_subsets",
    "map_family",
    "map_names",
    "mul_fusion",
    "subset_name",
    "validate_operators",
]
