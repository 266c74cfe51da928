"""A board's INFO and the TileSpec it describes, read the same way on both sides of the line.

The serial driver builds each tile's spec from INFO; the reference firmware fills INFO from its
tiles' specs. INFO carries the spec's fields under the spec's own names, and the capabilities
as bits (``firmware_protocol.messages.CapabilityBit``): the mapping is written here once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from cim_hil.tile import Capability, TileSpec
from firmware_protocol import messages as m

# The spec's fields that INFO carries by the same name (capabilities travel as a bitmap).
SPEC_FIELDS = tuple(f.name for f in fields(TileSpec) if f.name != "capabilities")


def capability_bits(capabilities: Iterable[Capability]) -> int:
    """INFO's capability bitmap for a tile's capabilities. A capability the protocol has no bit
    for (computed products: a host-side way of working, never a board's) is not sent."""
    return sum(int(m.CapabilityBit[c.value]) for c in set(capabilities) if c.value in m.CapabilityBit.__members__)


def capabilities_from_bits(bits: int) -> frozenset[Capability]:
    return frozenset(Capability(bit.name) for bit in m.CapabilityBit if bits & bit)


def spec_from_info(info: m.Info) -> TileSpec:
    """The spec of each tile of a board that answered HELLO with ``info``."""
    return TileSpec(**{name: getattr(info, name) for name in SPEC_FIELDS},
                    capabilities=capabilities_from_bits(info.capabilities))


def info_fields(spec: TileSpec) -> dict[str, Any]:
    """INFO's fields that come from a tile's spec, by INFO's names."""
    return {**{name: getattr(spec, name) for name in SPEC_FIELDS}, "capabilities": capability_bits(spec.capabilities)}
