"""The update rules, pure functions, against torch.optim step by step."""

import pytest
import torch

from cim_hil.training import rules


def gradients(shape, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


@pytest.mark.parametrize("betas, eps", [((0.9, 0.999), 1e-8), ((0.5, 0.9), 1e-3)])
def test_adam_steps_as_torch_adam(betas, eps):
    start = torch.randn(50, generator=torch.Generator().manual_seed(1))
    twin = start.clone().requires_grad_(True)
    reference = torch.optim.Adam([twin], lr=0.01, betas=betas, eps=eps)
    weights, exp_avg, exp_avg_sq = start.clone(), torch.zeros(50), torch.zeros(50)
    for step, grad in enumerate(gradients(50, 8), start=1):
        update, exp_avg, exp_avg_sq = rules.adam(grad, exp_avg, exp_avg_sq, step, 0.01, betas, eps)
        weights += update
        twin.grad = grad.clone()
        reference.step()
        assert torch.allclose(weights, twin.detach(), rtol=1e-6, atol=1e-7)
        state = reference.state[twin]
        assert torch.allclose(exp_avg, state["exp_avg"]) and torch.allclose(exp_avg_sq, state["exp_avg_sq"])


def test_the_rules_leave_their_arguments_as_they_were():
    grad, exp_avg, exp_avg_sq, buffer = (torch.randn(20, generator=torch.Generator().manual_seed(s)) for s in range(4))
    exp_avg_sq = exp_avg_sq.abs()
    kept = [t.clone() for t in (grad, exp_avg, exp_avg_sq, buffer)]
    rules.adam(grad, exp_avg, exp_avg_sq, 3, 0.01)
    rules.sgd(grad, buffer, 0.01, 0.9)
    assert all(torch.equal(a, b) for a, b in zip((grad, exp_avg, exp_avg_sq, buffer), kept))


def test_adam_with_one_step_count_per_element_matches_parameters_that_skipped_steps():
    """Two parameters end to end, the first without a gradient in steps 2 and 3: its bias
    correction falls behind, element by element."""
    twins = [torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)]
    reference = torch.optim.Adam(twins, lr=0.01)
    flat, exp_avg, exp_avg_sq = torch.zeros(7), torch.zeros(7), torch.zeros(7)
    counts = torch.zeros(7, dtype=torch.int64)
    for step, grad in enumerate(gradients(7, 6), start=1):
        active = torch.ones(7, dtype=torch.bool)
        if step in (2, 3):
            active[:3] = False
        chosen = active.nonzero().squeeze(1)
        counts[chosen] += 1
        update, new_avg, new_sq = rules.adam(grad[chosen], exp_avg[chosen], exp_avg_sq[chosen], counts[chosen], 0.01)
        flat[chosen] += update
        exp_avg[chosen], exp_avg_sq[chosen] = new_avg, new_sq
        for twin, part, on in zip(twins, grad.split([3, 4]), active.split([3, 4])):
            twin.grad = part.clone() if on.all() else None
        reference.step()
        assert torch.allclose(flat, torch.cat([t.detach() for t in twins]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_steps_as_torch_sgd(momentum):
    twin = torch.zeros(30, requires_grad=True)
    reference = torch.optim.SGD([twin], lr=0.05, momentum=momentum)
    weights, buffer = torch.zeros(30), torch.zeros(30)
    for grad in gradients(30, 6):
        update, new_buffer = rules.sgd(grad, buffer, 0.05, momentum)
        assert (new_buffer is None) == (momentum == 0)
        buffer = new_buffer if new_buffer is not None else buffer
        weights += update
        twin.grad = grad.clone()
        reference.step()
        assert torch.allclose(weights, twin.detach(), rtol=1e-6, atol=1e-7)
        if momentum:
            assert torch.allclose(buffer, reference.state[twin]["momentum_buffer"])
