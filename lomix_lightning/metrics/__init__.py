"""Evaluation metrics: medpy-exact HD95, per-class Dice/HD95/IoU with empty-mask rules, volume evaluation."""

from lomix_lightning.metrics.hd95 import hd95, surface_distances
from lomix_lightning.metrics.per_class import EmptyRule, binary_case_metrics, per_class_metrics
from lomix_lightning.metrics.summary import metrics_table, print_metrics_table
from lomix_lightning.metrics.volume import evaluate_volume, predict_volume

__all__ = [
    "EmptyRule",
    "binary_case_metrics",
    "evaluate_volume",
    "hd95",
    "metrics_table",
    "per_class_metrics",
    "predict_volume",
    "print_metrics_table",
    "surface_distances",
]
