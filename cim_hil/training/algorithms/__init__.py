"""Training algorithms beside mixed precision: plain analog SGD by pulses, mixed precision
without accumulation (the reference chip's control), and the Tiki-Taka family (TTv2, c-TTv2,
AGAD) with a fast array A and the weights C on tiles."""

from cim_hil.training.algorithms.analog_sgd import AnalogSGD
from cim_hil.training.algorithms.config import MIXED_PRECISION, TRANSFER, Algorithm, AlgorithmConfig
from cim_hil.training.algorithms.fast_array import FastArray, fast_arrays
from cim_hil.training.algorithms.no_accumulation import NoAccumulationOptimizer
from cim_hil.training.algorithms.pulses import stochastic_counts
from cim_hil.training.algorithms.transfer import TransferOptimizer

__all__ = [
    "MIXED_PRECISION",
    "TRANSFER",
    "Algorithm",
    "AlgorithmConfig",
    "AnalogSGD",
    "FastArray",
    "NoAccumulationOptimizer",
    "TransferOptimizer",
    "fast_arrays",
    "stochastic_counts",
]
