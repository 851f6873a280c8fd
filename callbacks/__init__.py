"""Lightning callbacks for LoMix, installed as ``lomix_lightning.callbacks``."""

from lomix_lightning.callbacks.best_epoch import BestEpochWeightBarChart
from lomix_lightning.callbacks.interrupt import InterruptCheckpoint
from lomix_lightning.callbacks.trajectory import WeightTrajectoryLogger

__all__ = ["BestEpochWeightBarChart", "InterruptCheckpoint", "WeightTrajectoryLogger"]
