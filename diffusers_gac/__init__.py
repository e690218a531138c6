"""diffusers-gac: post-training W4A4 quantization of diffusers models with Gradient-Aligned Calibration."""

from .api import CalibrationReport, quantize_model, record_calibration_data
from .calibration.data import CalibrationData, CalibrationRecorder
from .config import GACConfig

__version__ = "0.1.0.dev0"

__all__ = [
    "CalibrationData",
    "CalibrationRecorder",
    "CalibrationReport",
    "GACConfig",
    "quantize_model",
    "record_calibration_data",
]
