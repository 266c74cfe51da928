"""The wire codec stands alone: it imports with numpy and cobs, without torch or cim-hil; the
host's serial driver still reports its errors as cim-hil errors."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cim_hil.errors import BoardError, CimHilError
from drivers.simulators.virtual_board import VirtualBoard
from firmware_protocol import ProtocolError
from firmware_protocol import messages as m

from .conftest import make_config

# Any import of these raises ImportError, as in an environment where they are not installed.
BLOCKER = textwrap.dedent("""
    import sys
    from importlib.abc import MetaPathFinder

    class Absent(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {"torch", "cim_hil", "drivers", "pydantic", "serial", "pyvisa"}:
                raise ImportError(f"no module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Absent())
""")


def _run_without_torch(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(script)],
                          capture_output=True, text=True, timeout=120)


def test_the_blocker_blocks_torch():
    result = _run_without_torch("import torch")
    assert result.returncode != 0 and "blocked by the test" in result.stderr


def test_codec_imports_and_round_trips_without_torch_or_cim_hil():
    result = _run_without_torch("""
        import numpy as np
        import firmware_protocol
        from firmware_protocol import FrameDecoder, Reassembler, decode_frame, encode_frame, fragments, messages, vectors

        request = messages.Forward(1, False, np.arange(-64, 64, dtype=np.int8).reshape(2, 64), 30)
        decoder, reassembler, got = FrameDecoder(), Reassembler(), None
        for frame in fragments(request, 9, max_payload=40):
            (back,) = decoder.feed(encode_frame(frame))
            got = reassembler.add(back) or got
        assert (got.codes == request.codes).all() and got.outputs == 30
        vectors.check(vectors.build())
        try:
            decode_frame(b"\\x01\\x02")
        except firmware_protocol.ProtocolError as error:
            print("refused:", type(error).__name__)
        print(sorted(name for name in ("torch", "cim_hil", "pydantic") if name in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["refused: FramingError", "[]"]


def test_protocol_errors_are_value_errors_not_framework_errors():
    assert issubclass(ProtocolError, ValueError) and not issubclass(ProtocolError, CimHilError)


@pytest.mark.parametrize("transport", ["pty", "tcp"])
def test_a_request_the_codec_refuses_is_a_board_error_naming_the_port(transport):
    board = VirtualBoard(make_config(soc=dict(tiles=1, rows=8, cols=8), seed=2))
    url = board.open_pty() if transport == "pty" else board.open_tcp()
    board.start()
    try:
        from cim_hil.board import open_board

        with open_board(url) as host:
            bad = m.Forward(0, False, np.zeros((1, 8), dtype=np.float32), 8)  # codes must be int8/int16
            with pytest.raises(BoardError, match=f"FORWARD cannot be sent to the board on {url}: .*int8 or int16"):
                host.link.request(bad, m.Products)
            assert host[0].read_conductances().shape == (8, 8)  # the link is still in step
    finally:
        board.stop()
