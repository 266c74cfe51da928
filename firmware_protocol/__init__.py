"""The host <-> SoC wire format: COBS frames with CRC-16, fragments, typed messages (SPEC.md).

It stands alone (numpy and cobs, no torch, no cim_hil), so a board's host script or a firmware
engineer's test bench can use the codec without the framework.
"""

from firmware_protocol.errors import ProtocolError
from firmware_protocol.framing import MAX_PAYLOAD, VERSION, Frame, FrameDecoder, decode_frame, encode_frame
from firmware_protocol.messages import ErrorCode, Message, Reassembler, decode_message, fragments

__all__ = [
    "MAX_PAYLOAD",
    "VERSION",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "Message",
    "ProtocolError",
    "Reassembler",
    "decode_frame",
    "decode_message",
    "encode_frame",
    "fragments",
]
