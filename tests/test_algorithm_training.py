"""The on-device algorithms through the trainer and the command line (LeNet on the emulator)."""

import json
import subprocess
import sys

import torch

from cim_hil.training import TrainConfig, Trainer
from cim_hil.training.mnist import load_mnist


def test_trainer_resumes_agad_bit_for_bit(tmp_path):
    data = load_mnist()
    config = TrainConfig(train_limit=64, test_limit=50, epochs=2, lr=0.05, algorithm="agad",
                         algorithm_options={"settle_pairs": 20, "transfer_columns": 4})
    straight = Trainer(config, data, tmp_path / "straight", progress=False)
    straight.fit()
    interrupted = Trainer(config, data, tmp_path / "resumed", progress=False)
    interrupted.fit(1)
    resumed = Trainer.resume(tmp_path / "resumed", data, progress=False)
    resumed.fit()
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert straight.optimizer.write_statistics() == resumed.optimizer.write_statistics()
    assert all(torch.equal(a.devices.g, b.devices.g) for a, b in zip(straight.board, resumed.board))
    assert straight.history[-1]["pulses_a"] > 0 and "transfer_reads" in straight.history[-1]


def test_cli_trains_with_an_algorithm_and_refuses_a_bad_one(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "cim_hil.cli", "train", "--algorithm", "sgd", "--lr", "0.05", "--train-limit", "64",
         "--test-limit", "50", "--epochs", "1", "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["pulses_c"] > 0 and summary["pulses_a"] == 0
    bad = subprocess.run([sys.executable, "-m", "cim_hil.cli", "train", "--algorithm", "tiki"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
