"""Conductance relaxation after programming: how an emulated device moves while the chip waits.

Programmed memristors do not stay where write-verify left them: filamentary RRAM conductances
relax towards a resting state and spread wider over seconds to days after programming, and PCM
conductances drift as a power of time (Ielmini et al., IEEE TED 2007), both roughly linear in
log time; Joshi et al. (Nat. Commun. 2020) report a network's accuracy from seconds to a day
after programming in that way. This is our model in that shape, not a fit to any measurement.
A device written t seconds ago is

    L(t) = log10(1 + t / tau)

decades on, and a wait that takes it from L0 to L1 moves it by dL = L1 - L0:

    G <- G_r + (G - G_r) * exp(-drift * dL) + spread * spacing * sqrt(dL) * z

towards its relaxed conductance G_r = g_min + target * (g_max - g_min), with z a fresh standard
normal per device from its tile's stream, clamped to its bounds; a stuck device stays put. Waits
compose: the drift of two waits is that of one as long, and the spread's variance adds up (per
decade: spread^2 level spacings^2). The defaults of :class:`~cim_hil.config.DeviceConfig` (tau
1 s, drift 0.02, spread 0.3 level spacings) are ours, chosen so a day (L = 4.94) moves a device
at either end of its range by 0.7 level spacings on average and spreads devices by 0.67: they
set a scale, not a measured chip.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cim_hil.config import DeviceConfig
from cim_hil.emulator.store import DeviceStore


def decades(age_s: torch.Tensor, tau_s: float) -> torch.Tensor:
    """L(t) = log10(1 + t / tau) of every device's age."""
    return age_s.div(tau_s).log1p_().div_(math.log(10))


def relaxed(
    store: DeviceStore, config: DeviceConfig, before: torch.Tensor, after: torch.Tensor,
    normal: Callable[[], torch.Tensor],
) -> torch.Tensor | None:
    """The conductances of every device of ``store`` after its age goes from ``before`` to
    ``after`` (seconds); ``normal()`` draws a standard normal per device, called only when the
    spread is on. None when the model is off: nothing moves and no stream is drawn from."""
    if not (config.relaxation_drift or config.relaxation_spread_levels):
        return None
    step = decades(after, config.relaxation_tau_s).sub_(decades(before, config.relaxation_tau_s))
    g_min, g_max = store.g_min, store.g_max
    target = (g_max - g_min).mul_(config.relaxation_target).add_(g_min)
    moved = (store.g - target).mul_(step.mul(-config.relaxation_drift).exp_()).add_(target)
    if config.relaxation_spread_levels:
        moved.add_(normal().mul_(step.sqrt_().mul_(config.relaxation_spread_levels * config.level_spacing_us)))
    return torch.where(store.stuck, store.g, torch.minimum(torch.maximum(moved, g_min), g_max))
