"""Training on a board over its serial link: the bar shows the link's throughput and an ETA,
and metrics.jsonl says what each epoch spent on the link and on the chip."""

import json

from cim_hil.training import TrainConfig, Trainer
from cim_hil.training.mnist import load_mnist
from drivers.simulators.virtual_board import VirtualBoard

from .conftest import make_config


def test_a_board_run_shows_link_throughput_and_records_link_and_chip_time(tmp_path, capsys):
    board = VirtualBoard(make_config(soc=dict(tiles=18), seed=1))
    url = board.open_pty()
    board.start()
    try:
        config = TrainConfig(board=url, train_limit=64, test_limit=20, epochs=1, batch_size=32)
        trainer = Trainer(config, load_mnist(), tmp_path, progress=True)
        with trainer.board:
            trainer.fit()
            total = trainer.board.link_traffic()
    finally:
        board.stop()
    bars = capsys.readouterr().err
    assert "digit" in bars and "link=" in bars and "B/s" in bars and "<" in bars  # tqdm's "elapsed<ETA"
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for name in ("link_seconds", "link_bytes_out", "link_bytes_in", "chip_seconds"):
        assert row[name] > 0 and row[f"test_{name}"] > 0, name
    assert row["link_bytes_out"] + row["test_link_bytes_out"] <= total["link_bytes_out"]
