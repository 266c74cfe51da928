import pytest
import torch

from cim_hil.config import EmulatorConfig, validate
from drivers.simulators.virtual_board import VirtualBoard


def make_config(**sections) -> EmulatorConfig:
    """An EmulatorConfig with the given sections' fields overridden (nested dicts)."""
    data = EmulatorConfig().model_dump()
    for section, values in sections.items():
        if isinstance(values, dict):
            data[section].update(values)
        else:
            data[section] = values
    return validate(EmulatorConfig, data)


IDEAL = dict(
    device=dict(read_noise_levels=0.0, programming_error_levels=0.0, step_c2c=0.0, bounds_d2d=0.0),
    periphery=dict(input_bits=24, output_bits=24, adc_noise_levels=0.0, adc_full_scale_fraction=1.0, transpose=True),
)


@pytest.fixture
def ideal_config() -> EmulatorConfig:
    return make_config(**IDEAL)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(1234)


@pytest.fixture(params=["pty", "tcp"])
def serve(request):
    """``serve(config, **options)`` starts a virtual board on a fresh line, a real
    pseudo-terminal or a real socket (each test runs on both), and gives (url, board); every
    board started is stopped after the test."""
    boards = []

    def start(config: EmulatorConfig, **options) -> tuple[str, VirtualBoard]:
        board = VirtualBoard(config, **options)
        url = board.open_pty() if request.param == "pty" else board.open_tcp()
        boards.append(board.start())
        return url, board

    yield start
    for board in boards:
        board.stop()
