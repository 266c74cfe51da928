"""The exceptions cim-hil raises on purpose.

Everything a user can cause (a bad config, a shape that does not fit, a value outside the
device's safe range, a board that stopped answering) is a :class:`CimHilError`, so the CLI
can print one clear line instead of a traceback.
"""


class CimHilError(Exception):
    """Base of every error cim-hil raises for a problem the user can fix."""


class ConfigError(CimHilError, ValueError):
    """A configuration value is invalid; the message names the field."""


class ShapeError(CimHilError, ValueError):
    """An array handed to a tile does not have the shape the tile needs."""


class UnsafeValueError(CimHilError, ValueError):
    """A value lies outside the device's or instrument's safe range; nothing was sent."""


class CapabilityError(CimHilError):
    """The backend lacks an operation (for example transpose reads); it is reported, not faked."""


class BoardError(CimHilError):
    """A board could not be opened or stopped answering."""


class PlacementError(CimHilError):
    """A model's layers do not fit the board's tiles; the message lists the ways out."""
