"""Hyper-parameters of the training algorithms beside mixed precision (a part of ``TrainConfig``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cim_hil.config import Strict

Algorithm = Literal["mp", "mp-no-accumulation", "sgd", "ttv2", "c-ttv2", "agad"]
MIXED_PRECISION = ("mp", "mp-no-accumulation")
TRANSFER = ("ttv2", "c-ttv2", "agad")


class AlgorithmConfig(Strict):
    """What the on-device algorithms (``sgd``, ``ttv2``, ``c-ttv2``, ``agad``) need beyond the
    learning rate, which is the one of SGD (``TrainConfig.lr``): the weights (sgd) or A (the
    transfer family) move by -lr * gradient. The buffer H counts in pulses of C.

    Defaults follow aihwkit's (compounds.py) where ours means the same: ``in_chop_prob`` 0.1,
    one pulse per transfer event, the buffer forgotten after a transfer.
    """

    transfer_lr: float = Field(1.0, gt=0.0, description="H[:, k] += transfer_lr * (chopped) read of A's column k")
    transfer_every: int = Field(1, ge=1, description="steps between transfer events")
    transfer_columns: int = Field(1, ge=1, description="columns of A read per layer at each transfer event")
    threshold: float = Field(1.0, gt=0.0, description="|H| (in pulses of C) that makes a transfer to C")
    max_transfer_pulses: int = Field(1, ge=1, description="at most this many pulses per device per transfer")
    forget_buffer: bool = Field(True, description="H is forgotten after a transfer (else reduced by what was applied)")
    in_chop_prob: float = Field(0.1, ge=0.0, le=1.0, description="c-TTv2: flip chance of a column's sign after its "
                                "read; AGAD: flips every round(1 / in_chop_prob) reads")
    max_pulses: int = Field(31, ge=1, description="at most this many pulses per device per step on A (sgd: on W)")
    settle_pairs: int = Field(200, ge=0, description="AGAD: up/down pairs that bring A near its symmetry points first")
    reference_reads: int = Field(8, ge=1, description="reads averaged when A's reference devices are measured")
