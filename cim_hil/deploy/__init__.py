"""Deploy a trained model onto fresh chips, with post-training calibration on each."""

from cim_hil.deploy.calibrate import (
    Calibration,
    apply_calibration,
    calibrate_adc_ranges,
    calibrate_columns,
    calibrate_input_ranges,
)
from cim_hil.deploy.checkpoint import TrainedModel, load_trained
from cim_hil.deploy.deploy import DeployConfig, Deployment, chip_urls, deploy, load_calibration

__all__ = [
    "Calibration",
    "DeployConfig",
    "Deployment",
    "TrainedModel",
    "apply_calibration",
    "calibrate_adc_ranges",
    "calibrate_columns",
    "calibrate_input_ranges",
    "chip_urls",
    "deploy",
    "load_calibration",
    "load_trained",
]
