"""The on-device training algorithms on a small least-squares problem, against float SGD.

y = W* x + noise, 8 inputs and 4 outputs on 8x8 tiles of noise-free symmetric soft-bounds
devices (about 240 steps across the range). The weights read back from the devices,
W = (G - G_ref) * scale, are compared with float SGD's after the same steps and batches.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calibration import calibrate_references
from cim_hil.emulator import build_emulator
from cim_hil.errors import CapabilityError, ConfigError
from cim_hil.nn import MappingConfig, convert_to_analog
from cim_hil.training.algorithms import (
    AlgorithmConfig,
    AnalogSGD,
    NoAccumulationOptimizer,
    TransferOptimizer,
    fast_arrays,
    stochastic_counts,
)
from cim_hil.training.optimizer import MixedPrecisionOptimizer
from tests.conftest import IDEAL, make_config

IN, OUT, STEPS, LR = 8, 4, 600, 0.05
STEP_US = 0.1
DEVICE = dict(IDEAL["device"], step_up_us=STEP_US, step_down_us=STEP_US, step_d2d=0.0)
MAPPING = MappingConfig(programming="pulses", pulse_step_us=STEP_US / 2, weight_fill=0.25)
# The transfer family runs with A fast and the buffer slow (aihwkit sets the two apart too:
# fast_lr for A, transfer_lr for H): C's stiffness lr_A * transfer_lr is LR * 0.05, and A
# takes enough pulses for its decay to its symmetry point to damp C. With a slow A (lr_A 0.05,
# transfer_lr 0.05) the same algorithms are a nearly undamped double integrator (C integrates
# A, which integrates the gradient) and sit 0.43 (TTv2) / 0.68 (c-TTv2) from SGD.
FAST_LR = 0.8
OPTIONS = AlgorithmConfig(transfer_lr=LR * 0.05 / FAST_LR, transfer_columns=IN, settle_pairs=1500)
# Stated tolerances, |W - W_sgd| / |W_sgd| after 600 steps. At each of c-TTv2's random flips what
# A holds is read with the other sign until A has decayed, so C follows less closely than with
# TTv2; AGAD counts only what A moved since the last flip.
TOLERANCE = {"sgd": 0.1, "ttv2": 0.15, "c-ttv2": 0.3, "agad": 0.15}


def problem(steps: int = STEPS):
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(OUT, IN, generator=g) * 0.1
    x = torch.randn(steps, 16, IN, generator=g)
    y = x @ truth.T + 0.1 * torch.randn(steps, 16, OUT, generator=g)
    start = nn.Linear(IN, OUT, bias=False)
    start.weight.data = torch.randn(OUT, IN, generator=g) * 0.1
    return start, x, y


def board(**periphery):
    return build_emulator(make_config(device=DEVICE, periphery=dict(IDEAL["periphery"], **periphery),
                                      soc=dict(tiles=2, rows=8, cols=8)))


def train(optimizer, model, x, y):
    for inputs, targets in zip(x, y):
        optimizer.zero_grad()
        F.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def device_weights(model, tile) -> torch.Tensor:
    """What the devices hold, read without noise: (G - G_ref) * scale, as (out, in)."""
    g, reference = tile.devices.g[:IN, :OUT], tile.references.g[:IN, :OUT]
    return ((g - reference) * model[0].mapping.scale).T


def sgd_weights(start, x, y) -> torch.Tensor:
    model = copy.deepcopy(start)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    train(optimizer, model, x, y)
    return model.weight.detach()


def run(algorithm: str, start, x, y, chip=None, reference_offset_us: float = 0.0, options=OPTIONS):
    chip = chip or board()
    model = convert_to_analog(nn.Sequential(start), chip, MAPPING)
    if algorithm == "sgd":
        optimizer = AnalogSGD(model, lr=LR, options=options)
    else:
        if algorithm != "agad":
            calibrate_references(chip[1])
            if reference_offset_us:  # every reference of A off its symmetry point by the same amount
                chip[1].program_reference(chip[1].references.g + reference_offset_us)
        optimizer = TransferOptimizer(model, fast_arrays(model, chip.tiles[1:]), lr=FAST_LR, algorithm=algorithm,
                                      options=options)
    train(optimizer, model, x, y)
    return model, chip, optimizer


@pytest.mark.parametrize("algorithm", ["sgd", "ttv2", "c-ttv2", "agad"])
def test_on_ideal_symmetric_devices_the_weights_follow_sgd(algorithm):
    start, x, y = problem()
    expected = sgd_weights(start, x, y)
    model, chip, optimizer = run(algorithm, start, x, y)
    weights = device_weights(model, chip[0])
    moved, expected_move = (weights - start.weight.detach()).flatten(), (expected - start.weight.detach()).flatten()
    assert F.cosine_similarity(moved, expected_move, 0) > 0.85  # the direction SGD went
    assert float((weights - expected).norm() / expected.norm()) < TOLERANCE[algorithm]
    totals = optimizer.write_statistics()
    assert totals["pulses_c"] > 0 and (totals["pulses_a"] > 0) == (algorithm != "sgd")
    assert totals["transfer_reads"] == (0 if algorithm == "sgd" else STEPS * IN * OUT)


def test_the_chopper_cancels_a_reference_offset_that_biases_ttv2():
    """No gradient at all, and every reference of A 0.5 uS (10 pulses) above its symmetry
    point: each read of A then carries -0.5 uS, which TTv2 accumulates into C, every weight
    drifting the same way; c-TTv2's chopper alternates its sign, so C stays put on average.
    (Inside a training loop the gradient pushes A back against such a drift; on these fine
    symmetric devices that loop hides most of TTv2's bias, benchmarks/algorithms.py has the
    trained figures.)"""
    start, _, _ = problem(1)
    drift = {}
    for algorithm in ("ttv2", "c-ttv2"):
        chip = board()
        model = convert_to_analog(nn.Sequential(copy.deepcopy(start)), chip, MAPPING)
        calibrate_references(chip[1])
        chip[1].program_reference(chip[1].references.g + 0.5)
        optimizer = TransferOptimizer(model, fast_arrays(model, chip.tiles[1:]), lr=LR, algorithm=algorithm,
                                      options=OPTIONS.model_copy(update=dict(transfer_lr=0.01)))
        before = device_weights(model, chip[0])
        for _ in range(300):
            model[0].weight.grad = torch.zeros_like(model[0].weight)
            optimizer.step()
        drift[algorithm] = float((device_weights(model, chip[0]) - before).mean() / model[0].granularity)
    assert drift["ttv2"] < -10  # pulses of C, every weight pushed down
    assert abs(drift["c-ttv2"]) < 3


def test_agad_needs_no_reference_array():
    start, x, y = problem()
    expected = sgd_weights(start, x, y)
    chip = board(reference_devices=False)
    model = convert_to_analog(nn.Sequential(start), chip, MAPPING)
    with pytest.raises(CapabilityError, match="agad"):
        TransferOptimizer(model, fast_arrays(model, chip.tiles[1:]), lr=LR, algorithm="c-ttv2", options=OPTIONS)
    optimizer = TransferOptimizer(model, fast_arrays(model, chip.tiles[1:]), lr=FAST_LR, algorithm="agad",
                                  options=OPTIONS)
    train(optimizer, model, x, y)
    tile = chip[0]  # without reference devices the periphery subtracts a fixed mid-range current
    weights = ((tile.devices.g[:IN, :OUT] - tile.fixed_reference_us) * model[0].mapping.scale).T
    assert float((weights - expected).norm() / expected.norm()) < TOLERANCE["agad"]


@pytest.mark.parametrize("algorithm", ["sgd", "c-ttv2", "agad"])
def test_state_survives_a_checkpoint_and_resume_bit_for_bit(algorithm):
    start, x, y = problem(40)
    options = OPTIONS.model_copy(update=dict(settle_pairs=20, in_chop_prob=0.3))

    def fresh():
        chip = board()
        model = convert_to_analog(nn.Sequential(copy.deepcopy(start)), chip, MAPPING)
        if algorithm == "sgd":
            return chip, model, AnalogSGD(model, lr=LR, options=options, seed=5)
        return chip, model, TransferOptimizer(model, fast_arrays(model, chip.tiles[1:]), lr=LR, algorithm=algorithm,
                                              options=options, seed=5)

    chip, model, optimizer = fresh()
    train(optimizer, model, x[:20], y[:20])
    saved = copy.deepcopy((chip.state_dict(), model.state_dict(), optimizer.state_dict()))
    train(optimizer, model, x[20:], y[20:])
    again_chip, again_model, again = fresh()
    again_chip.load_state_dict(saved[0])
    again_model.load_state_dict(saved[1])
    again.load_state_dict(saved[2])
    train(again, again_model, x[20:], y[20:])
    assert torch.equal(chip[0].devices.g, again_chip[0].devices.g) and torch.equal(chip[1].devices.g, again_chip[1].devices.g)
    assert torch.equal(model[0].weight, again_model[0].weight)
    assert optimizer.write_statistics() == again.write_statistics()
    for mine, theirs in zip(optimizer.state.values(), again.state.values()):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_without_accumulation_updates_below_the_granularity_are_lost():
    chip = build_emulator(make_config(**IDEAL, soc=dict(tiles=1, rows=8, cols=8)))
    start = nn.Sequential(nn.Linear(IN, OUT, bias=False))
    start[0].weight.data.zero_()
    results = {}
    for kind in (MixedPrecisionOptimizer, NoAccumulationOptimizer):
        model = convert_to_analog(start, chip, MappingConfig())
        optimizer = kind(model, lr=1.0, rule="sgd")
        before = model[0].weight.detach().clone()
        for _ in range(10):  # ten steps of 0.35 epsilon each: 3 levels with accumulation
            model[0].weight.grad = torch.full_like(before, -0.35 * model[0].granularity)
            optimizer.step()
        results[kind] = (model[0].weight.detach() - before) / model[0].granularity
    assert torch.allclose(results[MixedPrecisionOptimizer], torch.full((OUT, IN), 3.0))
    assert torch.equal(results[NoAccumulationOptimizer], torch.zeros(OUT, IN))


def test_stochastic_counts_are_unbiased_integers_within_the_cap():
    generator = torch.Generator().manual_seed(0)
    expected = torch.tensor([0.25, -1.5, 2.0, 40.0]).repeat(20000, 1)
    counts = stochastic_counts(expected, generator, cap=31)
    assert counts.dtype == torch.int64 and int(counts.abs().max()) == 31
    assert torch.allclose(counts[:, :3].float().mean(0), torch.tensor([0.25, -1.5, 2.0]), atol=0.02)


def test_bad_choices_get_clear_errors():
    start, _, _ = problem(1)
    chip = board()
    model = convert_to_analog(nn.Sequential(start), chip, MAPPING)
    with pytest.raises(ConfigError, match="one of ttv2"):
        TransferOptimizer(model, fast_arrays(model, chip.tiles[1:]), lr=LR, algorithm="tiki")
    write_verify = convert_to_analog(nn.Sequential(start), chip, MappingConfig())
    with pytest.raises(ConfigError, match="programming = 'pulses'"):
        AnalogSGD(write_verify, lr=LR)
    with pytest.raises(ConfigError, match="tiles"):
        fast_arrays(model, [])


def test_transfer_learning_fine_tunes_a_pretrained_model_on_the_devices_to_a_new_task():
    """Small scale: a 196-32-10 net pretrained in float on digits 0-4, programmed, fine-tuned
    by analog SGD on the devices on digits 5-9, which it could not tell apart before."""
    from cim_hil.training.mnist import load_mnist
    from cim_hil.training.transfer_learning import accuracy, fit, task

    data = load_mnist()
    shrink = lambda images: F.avg_pool2d(images, 2).flatten(1)  # noqa: E731
    first, second = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(196, 32), nn.ReLU(), nn.Linear(32, 10))
    fit(model, torch.optim.Adam(model.parameters(), lr=3e-3), task(data.train, first).head(1000), 2, inputs=shrink)
    assert accuracy(model, task(data.test, first), shrink) > 0.85
    chip = build_emulator(make_config(soc=dict(tiles=5)))
    analog = convert_to_analog(model, chip, MappingConfig(programming="pulses"))
    new = task(data.test, second)
    assert accuracy(analog, new, shrink) == 0.0  # never trained on these classes
    fit(analog, AnalogSGD(analog, lr=0.1), task(data.train, second).head(1000), 1, inputs=shrink)
    assert accuracy(analog, new, shrink) > 0.25  # chance among the five new digits: 0.2; 0 before
