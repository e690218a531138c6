"""diffusers-gac: post-training W4A4 quantization of diffusers models with Gradient-Aligned Calibration."""

from .api import CalibrationReport, quantize_model, quantize_pipeline, record_calibration_data
from .calibration.data import CalibrationData, CalibrationRecorder
from .config import GACConfig, GACQuantizationMethod
from .hub import push_to_hub
from .quantizer import GACQuantizer


def _register_backend() -> None:
    """Make diffusers' from_pretrained know the "gac" quantization method (it has no plugin API: its two
    lookup tables are extended in place)."""
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZER_MAPPING[GACQuantizationMethod.GAC.value] = GACQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[GACQuantizationMethod.GAC.value] = GACConfig


_register_backend()

__version__ = "0.1.0.dev0"

__all__ = [
    "CalibrationData",
    "CalibrationRecorder",
    "CalibrationReport",
    "GACConfig",
    "GACQuantizer",
    "push_to_hub",
    "quantize_model",
    "quantize_pipeline",
    "record_calibration_data",
]
