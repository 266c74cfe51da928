"""Opens the emulated reference SoC as a ``Board``: ``emulator:[config-file][?key=value&...]``."""

from __future__ import annotations

from urllib.parse import parse_qsl

import torch

from cim_hil.board import Board
from cim_hil.config import EmulatorConfig, load_config, validate
from cim_hil.emulator.group import EmulatedGroup
from cim_hil.emulator.store import DeviceStore
from cim_hil.emulator.tile import EmulatedTile
from cim_hil.errors import ConfigError

QUERY_FIELDS = {"tiles": "soc", "rows": "soc", "cols": "soc", "first_tile": "soc", "transpose": "periphery", "seed": None,
                "torch_device": None}


def resolve_torch_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("torch_device: 'cuda' was asked for but no CUDA device is present")
    return torch.device(name)


def tile_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """Each tile its own stream, so adding a tile never changes the others' numbers."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


def build_emulator(config: EmulatorConfig, url: str = "emulator:") -> Board:
    torch_device = resolve_torch_device(config.torch_device)
    # Every tile's device state in one store: a layer's tiles are one slice of it.
    store = DeviceStore(config.soc.tiles, config.soc.rows, config.soc.cols, torch_device)
    tiles = [
        EmulatedTile(config, tile_generator(config.seed, config.soc.first_tile + index, torch_device), torch_device,
                     (store, index))
        for index in range(config.soc.tiles)
    ]
    info = {"backend": "emulator", "seed": config.seed, "clock_hz": config.timing.clock_hz}
    return Board(tiles, url, info, group_type=EmulatedGroup)


def config_from_url(url: str, base: EmulatorConfig | None = None) -> EmulatorConfig:
    rest = url.removeprefix("emulator:").removeprefix("//")
    path, _, query = rest.partition("?")
    config = load_config(path) if path else (base or EmulatorConfig())
    data = config.model_dump()
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in QUERY_FIELDS:
            raise ConfigError(f"unknown emulator URL option {key!r}; known: {', '.join(QUERY_FIELDS)}")
        section = QUERY_FIELDS[key]
        (data[section] if section else data)[key] = value
    return validate(EmulatorConfig, data)


def open_emulator(url: str, config: EmulatorConfig | None) -> Board:
    """The ``emulator:`` scheme's opener (the ``cim_hil.boards`` entry point)."""
    return build_emulator(config_from_url(url, config), url)
