"""Mixed-precision host training: the optimizer, MNIST, LeNet-5 and the trainer."""

from cim_hil.training.optimizer import MixedPrecisionOptimizer
from cim_hil.training.trainer import TrainConfig, Trainer

__all__ = ["MixedPrecisionOptimizer", "TrainConfig", "Trainer"]
