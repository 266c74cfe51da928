"""Analog torch layers on CIM tiles, and the converter from ordinary models."""

from cim_hil.nn.config import MappingConfig
from cim_hil.nn.convert import analog_layers, convert_to_analog, count_tiles
from cim_hil.nn.layers import AnalogConv2d, AnalogLayer, AnalogLinear

__all__ = [
    "AnalogConv2d",
    "AnalogLayer",
    "AnalogLinear",
    "MappingConfig",
    "analog_layers",
    "convert_to_analog",
    "count_tiles",
]
