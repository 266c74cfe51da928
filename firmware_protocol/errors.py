"""Protocol errors: each malformed input has its own exception, all under ``ProtocolError``.

The codec stands alone (numpy and cobs, no torch, no cim-hil), so a firmware engineer's host
script can use it anywhere; its errors are therefore plain ``ValueError``s. The host's serial
driver (drivers/link.py), where the framework meets the codec, turns them into cim-hil's
``BoardError`` naming the port.
"""


class ProtocolError(ValueError):
    """Bytes that are not a valid frame or message of this protocol."""


class FramingError(ProtocolError):
    """The COBS layer is broken (a corrupt or partial frame between delimiters)."""


class TruncatedFrameError(ProtocolError):
    """Fewer bytes than the header and CRC need, or than the header's length field says."""


class CrcError(ProtocolError):
    """The CRC-16 does not match the header and payload."""


class BadLengthError(ProtocolError):
    """A length field disagrees with the bytes present, or exceeds the maximum payload."""


class VersionError(ProtocolError):
    """The frame's protocol version is not one this side speaks."""


class UnknownMessageError(ProtocolError):
    """The message type is not in the catalogue."""


class PayloadError(ProtocolError):
    """A payload of a known type whose contents are inconsistent (sizes, counts, codes)."""
