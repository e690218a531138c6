"""diffusers-gac: post-training W4A4 quantization of diffusers models with Gradient-Aligned Calibration."""

import logging as _logging

from ._quiet import quiet_imports

with quiet_imports():
    from diffusers.quantizers import auto as _auto

# The package's loggers hang below diffusers' own: diffusers' handler prints them, and its verbosity switches
# (diffusers.utils.logging.set_verbosity_info() and the like) govern them.
_logging.getLogger(__name__).parent = _logging.getLogger("diffusers")

from .api import quantize_model, quantize_pipeline, record_calibration_data
from .calibration.data import CalibrationData, CalibrationRecorder
from .calibration.flow import CalibrationReport
from .config import GACConfig, GACQuantizationMethod, QuantizedLayout
from .hub import push_to_hub
from .inputs import CalibrationInputs
from .pretrained import calibrate_pretrained, load_prompts
from .quant.convert import set_execution
from .quantizer import GACQuantizer, install_load_guard, merge_quantization_configs
from .saving import save_pretrained


def _register_backend() -> None:
    """Make diffusers' from_pretrained know the "gac" quantization method (it has no plugin API: its two
    lookup tables are extended in place), and refuse diffusers-gac weights that lost their quantization config."""
    _auto.AUTO_QUANTIZER_MAPPING[GACQuantizationMethod.GAC.value] = GACQuantizer
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[GACQuantizationMethod.GAC.value] = GACConfig
    merge = _auto.DiffusersAutoQuantizer.merge_quantization_configs
    if not getattr(merge, "_gac", False):  # once, even if the package is reloaded
        wrapped = merge_quantization_configs(merge.__func__)
        wrapped._gac = True
        _auto.DiffusersAutoQuantizer.merge_quantization_configs = classmethod(wrapped)
    install_load_guard()


_register_backend()

__version__ = "0.1.0.dev0"

__all__ = [
    "CalibrationData",
    "CalibrationInputs",
    "CalibrationRecorder",
    "CalibrationReport",
    "GACConfig",
    "GACQuantizer",
    "QuantizedLayout",
    "calibrate_pretrained",
    "load_prompts",
    "push_to_hub",
    "quantize_model",
    "quantize_pipeline",
    "record_calibration_data",
    "save_pretrained",
    "set_execution",
]
