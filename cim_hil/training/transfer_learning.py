"""Analog transfer learning (in the spirit of arXiv:2505.11067): a model pretrained in float on
one task is programmed onto the chip and fine-tuned on the devices on another task.

The tasks are digit subsets of the offline MNIST data (say 0-4, then 5-9); a model keeps its
ten outputs throughout, so forgetting the first task shows in its accuracy there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cim_hil.training.mnist import Split


def task(split: Split, digits: tuple[int, ...]) -> Split:
    """The samples of ``split`` whose label is one of ``digits``."""
    chosen = torch.isin(split.labels, torch.tensor(digits))
    return Split(split.images[chosen], split.labels[chosen])


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, split: Split, epochs: int, batch_size: int = 32,
        seed: int = 0, inputs=lambda images: images) -> None:
    """Train on ``split`` with ``optimizer`` (float or analog), shuffled by ``seed``."""
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(split), generator=order).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs(split.images[batch])), split.labels[batch]).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, inputs=lambda images: images, batch_size: int = 500) -> float:
    model.eval()
    correct = sum(int((model(inputs(split.images[i : i + batch_size])).argmax(1) == split.labels[i : i + batch_size]).sum())
                  for i in range(0, len(split), batch_size))
    return correct / max(len(split), 1)
