"""Train LeNet-5 on MNIST against the emulator of the reference SoC, then the float baseline.

    python examples/train_lenet.py [epochs]

Writes runs/example-mp and runs/example-float (metrics.jsonl, curves.png, checkpoint.pt).
"""

import sys

from cim_hil.training import TrainConfig, Trainer
from cim_hil.training.mnist import load_mnist

epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
data = load_mnist()
print("data:", data.source)
for name, config in {
    "mp": TrainConfig(epochs=epochs),  # mixed precision on the emulator (LeNet needs 18 tiles)
    "float": TrainConfig(epochs=epochs, float_baseline=True),
}.items():
    trainer = Trainer(config, data, f"runs/example-{name}")
    last = trainer.fit()[-1]
    print(f"{name}: test accuracy {100 * last['test_acc']:.2f} % after {last['epoch']} epochs")
    if trainer.board is not None:
        print(f"  writes per weight: mean {last['writes_per_weight_mean']:.2f}, max {last['writes_per_weight_max']}; "
              f"{last['write_reduction']:.0f}x fewer writes than writing every weight every step")
