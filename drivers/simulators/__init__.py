"""Stand-ins for hardware: the reference firmware, the virtual board, line faults, SCPI instruments.

The only driver code allowed to import the emulator (the import contract in pyproject.toml says
so): each puts the emulator behind a real boundary (a pty, a socket, the firmware protocol, SCPI)
so the production drivers beside this package run unchanged against it.
"""
