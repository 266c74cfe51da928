"""The host <-> SoC wire format: COBS frames with CRC-16, fragments, typed messages (SPEC.md)."""

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
