"""The virtual board server survives its clients: RST, hosts killed mid-reply, a second host,
stale input between sessions. Real server processes, real sockets, real signals."""

import json
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import soak
from cim_hil.board import open_board
from cim_hil.cli import main
from cim_hil.config import LinkConfig
from drivers.link import BoardRefused
from drivers.simulators.virtual_board import VirtualBoard
from firmware_protocol import messages as m
from firmware_protocol.framing import Frame, FrameDecoder, encode_frame

from .conftest import make_config

ROOT = Path(__file__).resolve().parents[1]
QUICK = LinkConfig(response_timeout_s=0.5, retries=3)
SMALL = make_config(soc=dict(tiles=1, rows=16, cols=16), seed=5)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def server():
    """``cim-hil board serve --tcp 0`` in its own process; yields (process, url, port)."""
    process, url, port = soak.serve()
    yield process, url, port
    process.terminate()
    _, errors = process.communicate(timeout=10)
    assert not errors  # never a traceback, whatever the clients did


def _reset_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _alive_and_answering(process, url) -> None:
    with open_board(url, QUICK) as board:
        assert board.info()["tiles"] == 1
    assert process.poll() is None


def test_a_client_that_resets_does_not_kill_the_server(server, capsys):
    process, url, port = server
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"\x00" + b"\x11" * 100)  # the reproduction
    _reset_close(sock)
    code, out, err = _cli(capsys, "board", "info", url)
    assert code == 0, err
    assert json.loads(out)["tiles"] == 1
    assert process.poll() is None


def test_replies_into_a_reset_socket_do_not_kill_the_server(server):
    process, url, port = server
    sock = socket.create_connection(("127.0.0.1", port))
    for seq in range(1, 2000):  # thousands of replies the client never reads...
        sock.sendall(encode_frame(Frame(m.ReadCounters.TYPE, seq, m.ReadCounters(0).encode())))
    _reset_close(sock)  # ...and then it vanishes while the server is writing them
    _alive_and_answering(process, url)


def test_a_host_killed_mid_session_does_not_kill_the_server(server):
    process, url, _ = server
    host = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch; from cim_hil.board import open_board\n"
        "board = open_board(sys.argv[1]); print('open', flush=True)\n"
        "while True: board[0].read_conductances(); board[0].forward(torch.zeros(64, 64))\n"), url],
        stdout=subprocess.PIPE, text=True)
    assert host.stdout.readline().strip() == "open"
    time.sleep(0.3)
    host.send_signal(signal.SIGKILL)
    host.wait()
    _alive_and_answering(process, url)


def test_a_second_host_is_refused_clearly_and_served_after_the_first_leaves(server, capsys):
    process, url, _ = server
    with open_board(url, QUICK):
        with pytest.raises(BoardRefused, match="BUSY: the board is serving another host") as refused:
            open_board(url, QUICK)
        assert refused.value.code == m.ErrorCode.BUSY
        code, _, err = _cli(capsys, "board", "info", url)
        assert code == 2
        assert err.count("\n") == 1 and "serving another host" in err
    _alive_and_answering(process, url)


def _request(sock: socket.socket, frame: Frame) -> Frame:
    sock.sendall(encode_frame(frame))
    decoder = FrameDecoder()
    while True:
        frames = decoder.feed(sock.recv(65536))
        if frames:
            return frames[0]


def test_a_new_host_never_gets_the_last_hosts_answer_or_half_message():
    board = VirtualBoard(SMALL)
    url = board.open_tcp()
    port = int(url.rsplit(":", 1)[1])
    board.start()
    try:
        pulses = m.PulsesDense(0, 0, torch.ones(16, 16, dtype=torch.int16).numpy())
        first = socket.create_connection(("127.0.0.1", port))
        payload = pulses.encode()
        _request(first, Frame(m.PulsesDense.TYPE, 7, payload))
        # Half of a second message, left behind as the host dies.
        assert _request(first, Frame(m.PulsesDense.TYPE, 8, payload[:40], flags=1)).type == m.Ack.TYPE
        _reset_close(first)
        second = socket.create_connection(("127.0.0.1", port))
        # The same seq and type as the last host's: it runs (a new session), not answered from the past.
        reply = _request(second, Frame(m.PulsesDense.TYPE, 7, payload))
        assert reply.type == m.PulsesApplied.TYPE
        # The last fragment of a message whose start came from the dead host is not glued to it.
        lone = _request(second, Frame(m.PulsesDense.TYPE, 9, payload[40:]))
        assert lone.type == m.Error.TYPE and m.Error.decode(lone.payload).code == m.ErrorCode.BAD_LENGTH
        second.close()
        assert board.firmware.executed["PulsesDense"] == 2
    finally:
        board.stop()


def test_serve_refuses_a_port_out_of_range_or_in_use(capsys):
    code, _, err = _cli(capsys, "board", "serve", "--tcp", "70000")
    assert code == 2 and err == "cim-hil: error: TCP port 70000 is outside 0..65535\n"
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        code, _, err = _cli(capsys, "board", "serve", "--tcp", str(taken.getsockname()[1]))
    finally:
        taken.close()
    assert code == 2 and err.count("\n") == 1
    assert "cannot listen on 127.0.0.1:" in err and "in use" in err


def test_short_soak_every_answer_right_and_memory_bounded(server):
    report = soak.soak(*server, clients=30, every=6)
    assert report["server_alive"]
    assert report["wrong_answers"] == 0 and report["well_behaved_requests"] == 15
    assert report["rss_growth_mb"] < 20


@pytest.mark.slow
def test_full_soak_benchmark():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py")], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["clients"] == 200 and report["server_alive"] and report["server_stderr_lines"] == 0
    assert report["wrong_answers"] == 0 and report["rss_growth_mb"] < 20
