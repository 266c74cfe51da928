"""``cim-hil deploy``: its arguments and its handler, beside the deployment they drive."""

from __future__ import annotations

import argparse
import json
import math
import sys

from cim_hil.errors import ConfigError


def register(commands: argparse._SubParsersAction) -> None:
    deploy = commands.add_parser("deploy", help="program a trained run onto fresh chips, calibrate, report accuracy")
    deploy.add_argument("checkpoint", help="a run directory of cim-hil train (or its checkpoint.pt)")
    deploy.add_argument("--board", action="append", help="board URL; repeat for several serial boards "
                        "(default: emulator:, one fresh seed per chip)")
    deploy.add_argument("--chips", type=int, help="emulator chips to draw (default 10)")
    deploy.add_argument("--first-seed", type=int, help="emulator chip k gets seed FIRST_SEED + k (default 1000)")
    deploy.add_argument("--no-column-calibration", action="store_true", help="keep one conductance range per layer")
    deploy.add_argument("--no-input-calibration", action="store_true", help="keep scaling each input to the DAC's range")
    deploy.add_argument("--no-adc-calibration", action="store_true", help="keep each tile's power-on ADC range")
    deploy.add_argument("--calibration-images", type=int, help="training digits the input and ADC calibration see "
                        "(default 128)")
    deploy.add_argument("--test-limit", type=int, help="evaluate on the first N test digits only")
    deploy.add_argument("--relax", metavar="TIMES", help="evaluate each chip again this long after "
                        "programming, while its conductances relax: comma-separated, each a number with s, m, h or "
                        "d (e.g. 1s,1h,1d)")
    deploy.add_argument("--data-dir", help="directory with the MNIST IDX files (default: offline data)")
    deploy.add_argument("--out", help="directory for deployment.json and the histogram (default: CHECKPOINT/deploy)")
    deploy.add_argument("--no-progress", action="store_true", help="no progress bar")
    deploy.set_defaults(run=run_deploy)


SECONDS_PER = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def durations(text: str) -> tuple[float, ...]:
    """``1s,1h,1d`` as seconds: each a positive number and a unit (s, m, h or d)."""
    times = []
    for part in text.split(","):
        part = part.strip()
        try:
            seconds = float(part[:-1]) * SECONDS_PER[part[-1:]]
        except (KeyError, ValueError):
            seconds = math.nan
        if not 0 < seconds < math.inf:
            raise ConfigError(f"--relax: {part!r} is not a time; give positive numbers with a unit, s, m, h or d, "
                              "joined by commas (e.g. 1s,1h,1d)")
        times.append(seconds)
    return tuple(times)


def run_deploy(args: argparse.Namespace) -> None:
    """Deploy a run's model onto the chips, print the summary; results and histogram in --out."""
    from pathlib import Path

    from cim_hil.config import validate
    from cim_hil.deploy import DeployConfig, deploy, load_trained
    from cim_hil.deploy.deploy import HISTOGRAM, RESULTS
    from cim_hil.training.mnist import load_mnist

    trained = load_trained(args.checkpoint)
    flags = {
        "chips": args.chips,
        "first_seed": args.first_seed,
        "calibrate_columns": False if args.no_column_calibration else None,
        "calibrate_inputs": False if args.no_input_calibration else None,
        "calibrate_adc": False if args.no_adc_calibration else None,
        "calibration_images": args.calibration_images,
        "relax_after_s": durations(args.relax) if args.relax is not None else None,
        "test_limit": args.test_limit if args.test_limit is not None else trained.config.get("test_limit"),
    }
    config = validate(DeployConfig, {k: v for k, v in flags.items() if v is not None})
    data = load_mnist(args.data_dir, seed=trained.config.get("seed", 0))
    print(f"data: {data.source}", file=sys.stderr)
    run_dir = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    out = Path(args.out) if args.out else run_dir / "deploy"
    report = deploy(trained, data, args.board or ["emulator:"], config, out, progress=not args.no_progress)
    summary = {key: value for key, value in report.items() if key not in ("chips", "config")}
    summary["seeds"] = [row["seed"] for row in report["chips"]]
    summary["files"] = [str(out / name) for name in (RESULTS, HISTOGRAM)]
    print(json.dumps(summary, indent=2))
