"""Boards behind a real boundary: a SoC on a serial line (link, serial_board, board_info) and a
crossbar on a probe station through VISA instruments (instruments, instrument_board).

Each driver offers its board URL schemes as ``cim_hil.boards`` entry points; none imports the
emulator. ``drivers.simulators`` holds the stand-ins for hardware, the one place that does.
"""
