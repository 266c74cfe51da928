"""Update rules as pure functions: gradient and state in, update and new state out.

Each returns the update to add (already times -lr) and the rule's new state, and changes
none of its arguments, so a caller can compute a step aside and keep it only once the step
has succeeded (the mixed-precision optimizer programs devices in between). They run on flat
tensors of any number of parameters; the numbers are those of ``torch.optim.SGD`` and
``torch.optim.Adam`` (tests compare them step by step).
"""

from __future__ import annotations

import math

import torch

Step = int | torch.Tensor
"""A step count (1 on the first step): one for every element, or a tensor of one per element
(parameters that skipped steps fall behind the others)."""


def sgd(
    grad: torch.Tensor, momentum_buffer: torch.Tensor | None, lr: float, momentum: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SGD with (undampened) momentum: the update -lr * buffer and the new buffer, which is
    momentum * buffer + grad (the gradient itself on the first step: pass a zero buffer). No
    momentum: the update -lr * grad and no buffer."""
    if not momentum:
        return grad.mul(-lr), None
    buffer = momentum_buffer.mul(momentum).add_(grad)
    return buffer.mul(-lr), buffer


def adam(
    grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: Step, lr: float,
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam with bias correction: the update and the new first and second moments; ``step`` is
    the step being taken (the moments start at zero before step 1)."""
    beta1, beta2 = betas
    exp_avg = torch.lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt().div_(_of_step(step, lambda s: math.sqrt(1 - beta2**s)))
    update = exp_avg.div(denom.add_(eps))
    update.mul_(_of_step(step, lambda s: -lr / (1 - beta1**s)))
    return update, exp_avg, exp_avg_sq


def _of_step(step: Step, factor) -> float | torch.Tensor:
    """``factor`` of the step count: a number, or one per element of a tensor of counts."""
    if isinstance(step, int):
        return factor(step)
    counts, where = torch.unique(step, return_inverse=True)
    return torch.tensor([factor(count) for count in counts.tolist()], dtype=torch.float32)[where]
