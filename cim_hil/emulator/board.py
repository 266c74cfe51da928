"""Opens the emulated reference SoC as a ``Board``: ``emulator:[config-file][?key=value&...]``."""

from __future__ import annotations

import os
from urllib.parse import parse_qsl

import torch

from cim_hil.board import Board
from cim_hil.config import EmulatorConfig, load_config, validate
from cim_hil.emulator.group import EmulatedGroup
from cim_hil.emulator.relaxation import relaxed
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


BYTES_PER_DEVICE = 72  # the emulator's host memory per device (state of both arrays), as measured


def _available_memory() -> int:
    """Bytes this machine can still give (MemAvailable), or all its memory where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_memory(config: EmulatorConfig) -> None:
    """Refuse a geometry the host cannot hold, before allocating any of it."""
    soc = config.soc
    needed, available = soc.tiles * soc.rows * soc.cols * BYTES_PER_DEVICE, _available_memory()
    if needed > available:
        raise ConfigError(
            f"an emulator of {soc.tiles} tiles of {soc.rows}x{soc.cols} needs about {needed / 2**30:.3g} GiB; "
            f"this machine has {available / 2**30:.3g} GiB available"
        )


class EmulatedBoard(Board):
    """The emulated SoC's tiles and their one device store, whose clock a wait advances."""

    tiles: list[EmulatedTile]

    def __init__(self, tiles: list[EmulatedTile], store: DeviceStore, url: str, info: dict) -> None:
        super().__init__(tiles, url, info, group_type=EmulatedGroup)
        self.store = store

    @property
    def can_let_time_pass(self) -> bool:
        return True

    def _let_time_pass(self, seconds: float) -> None:
        """Every device relaxes by its age (:mod:`cim_hil.emulator.relaxation`), drawing its
        noise from its tile's stream (weight devices, then references), so a seed gives the
        same chip after any wait. The tiles' counters do not move: the chip is idle."""
        config = self.tiles[0].config

        def normal() -> torch.Tensor:
            return torch.stack([torch.randn(self.store.g.shape[1:], generator=tile.generator,
                                            device=self.store.g.device) for tile in self.tiles])

        self.store.pass_time(seconds, lambda before, after: relaxed(self.store, config.device, before, after, normal))


def build_emulator(config: EmulatorConfig, url: str = "emulator:") -> Board:
    check_fits_memory(config)
    torch_device = resolve_torch_device(config.torch_device)
    # Every tile's device state in one store: a layer's tiles are one slice of it.
    store = DeviceStore(config.soc.tiles, config.soc.rows, config.soc.cols, torch_device)
    tiles = [
        EmulatedTile(config, tile_generator(config.seed, config.soc.first_tile + index, torch_device), torch_device,
                     (store, index))
        for index in range(config.soc.tiles)
    ]
    info = {"backend": "emulator", "seed": config.seed, "clock_hz": config.timing.clock_hz}
    return EmulatedBoard(tiles, store, url, info)


def config_from_url(url: str, base: EmulatorConfig | None = None) -> EmulatorConfig:
    rest = url.removeprefix("emulator:").removeprefix("//")
    path, _, query = rest.partition("?")
    if base is not None and not isinstance(base, EmulatorConfig):
        raise ConfigError(f"the emulator takes an EmulatorConfig, got {type(base).__name__}")
    config = load_config(path) if path else (base or EmulatorConfig())
    data = config.model_dump()
    try:
        options = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(f"emulator URL options must be key=value pairs joined by '&', got {query!r}") from None
    for key, value in options:
        if key not in QUERY_FIELDS:
            raise ConfigError(f"unknown emulator URL option {key!r}; known: {', '.join(QUERY_FIELDS)}")
        section = QUERY_FIELDS[key]
        (data[section] if section else data)[key] = value
    return validate(EmulatorConfig, data)


def open_emulator(url: str, config: EmulatorConfig | None) -> Board:
    """The ``emulator:`` scheme's opener (the ``cim_hil.boards`` entry point)."""
    return build_emulator(config_from_url(url, config), url)
