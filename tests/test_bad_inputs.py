"""Inputs that used to give a traceback, a silent truncation or a confidently wrong answer:
each is now one clear error (or the right answer) and leaves the tile untouched."""

import gzip
import struct

import numpy as np
import pytest
import torch

from calibration import characterise, emulator_config_from_fit
from cim_hil.board import open_board
from cim_hil.cli import main
from cim_hil.config import EmulatorConfig, LinkConfig, load_config
from cim_hil.emulator.board import build_emulator, config_from_url
from cim_hil.errors import CimHilError, ConfigError, ShapeError, UnsafeValueError
from cim_hil.tile import MAX_VERIFY_WORK
from cim_hil.training.mnist import load_mnist
from drivers.simulators.virtual_board import VirtualBoard
from firmware_protocol import messages as m

from .conftest import make_config


@pytest.fixture
def tile():
    return build_emulator(make_config(soc=dict(tiles=1, rows=32, cols=32), seed=3))[0]


def _untouched(tile, call, error, match):
    """``call`` raises ``error`` and changes neither the devices nor the random stream."""
    g, stream, counters = tile.devices.g.clone(), tile.devices.generator.get_state(), tile.counters.as_dict()
    with pytest.raises(error, match=match):
        call()
    assert torch.equal(tile.devices.g, g) and torch.equal(tile.devices.generator.get_state(), stream)
    assert tile.counters.as_dict() == counters


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_int_min_pulse_counts_are_refused_not_wrapped(tile, dtype):
    lowest = torch.iinfo(dtype).min
    counts = torch.zeros(32, 32, dtype=dtype)
    counts[3, 4] = lowest
    _untouched(tile, lambda: tile.apply_pulses(counts), UnsafeValueError, f"pulse count {lowest} exceeds")
    nan_cast = torch.full((32, 32), float("nan")).to(dtype)  # what NaN becomes as an integer
    _untouched(tile, lambda: tile.apply_pulses(nan_cast), UnsafeValueError, "exceeds max_pulses_per_call")


@pytest.mark.parametrize("call, error, match", [
    (lambda t: t.forward(torch.zeros(2, 32), outputs=1.5), ShapeError, "outputs must be an integer, got 1.5"),
    (lambda t: t.forward(torch.zeros(2, 32), outputs="abc"), ShapeError, "outputs must be an integer, got 'abc'"),
    (lambda t: t.program_verify(torch.full((32, 32), 20.0), max_trials=2.7), UnsafeValueError,
     "max_trials must be an integer, got 2.7"),
    (lambda t: t.program_verify(torch.full((32, 32), 20.0), max_trials=100000), UnsafeValueError,
     "max_trials must be between 1 and 65535, got 100000"),
    (lambda t: t.program_verify(torch.full((32, 32), 20.0), max_trials=65535), UnsafeValueError,
     "device-trials exceeds"),
    (lambda t: t.forward(torch.zeros(2, 32, dtype=torch.complex64)), ShapeError, "must be real-valued"),
    (lambda t: t.forward("abc"), ShapeError, "forward input must be a tensor of numbers, got str"),
    (lambda t: t.forward(None), ShapeError, "forward input must be a tensor of numbers, got NoneType"),
    (lambda t: t.program_verify(None), ShapeError, "targets must be a tensor of numbers"),
    (lambda t: t.read_conductances((0, 2.5, 0, 4)), ShapeError, "a window bound must be an integer"),
])
def test_bad_arguments_are_refused_in_the_tile_base(tile, call, error, match):
    _untouched(tile, lambda: call(tile), error, match)


def test_large_but_finite_inputs_are_not_taken_for_nan(tile):
    assert torch.isfinite(tile.forward(torch.full((4, 32), 1e38))).all()  # their sum overflows float32
    half = torch.full((3, 32), 60000.0, dtype=torch.float16)  # valid, and their float16 sum is inf
    twin = build_emulator(make_config(soc=dict(tiles=1, rows=32, cols=32), seed=3))[0]
    again = build_emulator(make_config(soc=dict(tiles=1, rows=32, cols=32), seed=3))[0]
    assert torch.equal(twin.forward(half), again.forward(half.float()))
    with pytest.raises(UnsafeValueError, match="NaN or infinite"):
        tile.forward(torch.tensor([[1.0, float("nan")] + [0.0] * 30]))


def test_a_board_bounds_the_work_of_one_program_request():
    """A 16 KB PROGRAM with max_trials 65535 on 1,024 devices is refused, not run in 1.6 GB."""
    server = VirtualBoard(make_config(soc=dict(tiles=1, rows=64, cols=64)))
    url = server.open_tcp()
    server.start()
    try:
        before = server.firmware.board[0].devices.g.clone()
        with open_board(url, LinkConfig(response_timeout_s=2.0)) as board:
            targets = np.full((64, 64), np.nan, dtype=np.float32)
            targets[:16] = 20.0  # 1,024 devices
            with pytest.raises(UnsafeValueError, match=f"exceeds the {MAX_VERIFY_WORK} one write-verify call"):
                board.link.request(m.Program(0, 0, 65535, 0.0, targets), m.ProgramReport)
            assert board.info()["tiles"] == 1  # it still answers
        assert torch.equal(server.firmware.board[0].devices.g, before)  # and programmed nothing
    finally:
        server.stop()
    assert server.firmware.executed["Program"] == 0


def test_characterising_a_stuck_tile_never_fits_a_stuck_device(tmp_path, capsys):
    config = make_config(soc=dict(tiles=1, rows=16, cols=16), device=dict(stuck_fraction=0.4), seed=2)
    tile = build_emulator(config)[0]
    result = characterise(tile, progress=False)
    fitted, stuck = torch.from_numpy(result["fitted"]), tile.devices.stuck
    assert not (fitted & stuck).any() and fitted[~stuck].all()
    assert result.metadata.summary["not_responding"] == int(stuck.sum())
    all_stuck = build_emulator(make_config(soc=dict(tiles=1, rows=16, cols=16), device=dict(stuck_fraction=1.0)))[0]
    empty = characterise(all_stuck, progress=False)
    assert empty.metadata.summary["fitted"] == 0
    with pytest.raises(UnsafeValueError, match="256 of 256 devices did not respond to pulses"):
        emulator_config_from_fit(empty)
    (tmp_path / "stuck.toml").write_text("[device]\nstuck_fraction = 1.0\n")
    code = main(["calibrate", "characterise", "--board", f"emulator:{tmp_path / 'stuck.toml'}",
                 "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "did not respond to pulses" in err
    assert not (tmp_path / "out" / "fitted_emulator.json").exists()


def test_config_and_url_mistakes_are_one_clear_error(tmp_path):
    latin = tmp_path / "latin.toml"
    latin.write_bytes("[device]\n# r\xe9glage\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(latin)
    with pytest.raises(ConfigError, match="must be key=value pairs"):
        config_from_url("emulator:?foo")
    with pytest.raises(ConfigError, match=r"4096 tiles of 8192x8192 needs about .* GiB; this machine has"):
        open_board("emulator:?tiles=4096&rows=8192&cols=8192")
    with pytest.raises(ConfigError, match="the emulator takes an EmulatorConfig, got int"):
        open_board("emulator:", 42)
    assert isinstance(config_from_url("emulator:?tiles=2"), EmulatorConfig)


def _idx(path, dims, payload: bytes, magic=0x08):
    path.write_bytes(gzip.compress(bytes([0, 0, magic, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload))


def test_bad_idx_files_and_data_directories_are_refused(tmp_path):
    with pytest.raises(CimHilError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CimHilError, match="holds none of the MNIST IDX files"):
        load_mnist(tmp_path / "empty")
    data = tmp_path / "data"
    data.mkdir()
    for which in ("train", "t10k"):
        _idx(data / f"{which}-images-idx3-ubyte.gz", (3, 10, 10), bytes(300))
        _idx(data / f"{which}-labels-idx1-ubyte.gz", (3,), bytes([1, 2, 3]))
    with pytest.raises(CimHilError, match=r"shape \(10, 10\), not MNIST's 28x28"):
        load_mnist(data)
    for which in ("train", "t10k"):
        _idx(data / f"{which}-images-idx3-ubyte.gz", (3, 28, 28), bytes(3 * 784))
        _idx(data / f"{which}-labels-idx1-ubyte.gz", (3,), bytes([1, 12, 3]))
    with pytest.raises(CimHilError, match="holds label 12"):
        load_mnist(data)
    (data / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 3, 0, 0])))  # header cut short
    with pytest.raises(CimHilError, match="truncated: its header names 3 dimensions"):
        load_mnist(data)


def test_cli_refuses_bad_numbers_in_one_line(tmp_path, capsys):
    for argv, message in [
        (["demo", "--batch", "0"], "--batch must be at least 1"),
        (["train", "--lr", "inf", "--out", str(tmp_path / "a")], "lr: Input should be a finite number"),
        (["train", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "b")], "does not exist"),
        (["train", "--out", str(tmp_path / "c"), "--resume"], "no checkpoint to resume from"),
        (["train", "--nproc", "0", "--out", str(tmp_path / "e")], "--nproc must be at least 1, got 0"),
        (["train", "--rank-boards", "emulator:", "emulator:", "--out", str(tmp_path / "f")],
         "give --nproc N as well, or run under torchrun"),
        (["train", "--nproc", "3", "--rank-boards", "emulator:", "emulator:", "--out", str(tmp_path / "g")],
         "names 2 board(s) for 3 ranks"),
        (["train", "--nproc", "2", "--algorithm", "ttv2", "--out", str(tmp_path / "h")],
         "data-parallel ranks train with mixed precision only"),
        (["train", "--nproc", "2", "--distributed-timeout", "inf", "--out", str(tmp_path / "i")],
         "distributed_timeout_s: Input should be a finite number"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
        if "--nproc" in argv or "--rank-boards" in argv:  # refused before the run directory is claimed
            assert not (tmp_path / argv[-1]).exists(), argv
    (tmp_path / "d").mkdir()
    torch.save({"not": "a checkpoint"}, tmp_path / "d" / "checkpoint.pt")
    assert main(["train", "--out", str(tmp_path / "d"), "--resume"]) == 2
    assert "is not a cim-hil checkpoint" in capsys.readouterr().err
    torch.save([1, 2, 3], tmp_path / "d" / "checkpoint.pt")
    assert main(["train", "--out", str(tmp_path / "d"), "--resume"]) == 2
    assert "is not a cim-hil checkpoint (it holds a list)" in capsys.readouterr().err


def test_calibrate_checks_its_out_before_touching_the_board(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["calibrate", "symmetry", "--zero-shift", "--board", "nowhere:",  # never reached
                 "--out", str(tmp_path / "file"), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"cim-hil: error: --out {tmp_path / 'file'} is a file, not a directory\n"


def test_socket_urls_without_a_usable_port_are_named(capsys):
    for url, message in [("socket://127.0.0.1:99999", "port 99999 is outside 1..65535"),
                         ("socket://127.0.0.1", "needs a port")]:
        assert main(["board", "info", url]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
