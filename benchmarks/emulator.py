"""Emulator speed against plain torch, measured in one run.

One training step on a tile = forward product + transpose product + a pulse update
(one signed pulse on every device). The baseline does the same shapes in plain torch: the two
matmuls and an in-place add of the update. Prints one JSON object.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import best_seconds  # noqa: E402

from cim_hil import open_board  # noqa: E402

BATCH = 64


def measure(size: int) -> dict[str, float]:
    tile = open_board(f"emulator:?tiles=1&rows={size}&cols={size}&transpose=true")[0]
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, size, generator=generator) * 2 - 1
    d = torch.rand(BATCH, size, generator=generator) * 2 - 1
    counts = torch.randint(-1, 2, (size, size), generator=generator)

    def emulated_step():
        tile.forward(x)
        tile.backward(d)
        tile.apply_pulses(counts)

    weights = torch.rand(size, size, generator=generator)
    update = counts.to(torch.float32)

    def plain_step():
        x @ weights
        d @ weights.T
        weights.add_(update)

    emulated = best_seconds(emulated_step)
    plain = best_seconds(plain_step)
    return {"step_s": emulated, "matmul_s": plain, "ratio": emulated / plain}


def main() -> None:
    tile = open_board("emulator:")[0]
    tile.forward(torch.zeros(1, 64))
    small, large = measure(64), measure(512)
    print(
        json.dumps(
            {
                "cycles_per_forward_64x64": tile.counters.cycles,
                "batch": BATCH,
                "step_s_64": small["step_s"],
                "matmul_s_64": small["matmul_s"],
                "ratio_to_matmul_64": small["ratio"],
                "step_s_512": large["step_s"],
                "matmul_s_512": large["matmul_s"],
                "ratio_to_matmul_512": large["ratio"],
                "threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
