"""``GACQuantizer``: the diffusers loading hooks for the "gac" backend, and nothing else.

* Loading a full-precision checkpoint with ``quantization_config=GACConfig(...)`` calibrates after the weights
  are loaded (``_process_model_after_weight_loading``); calibration inputs come from ``integration.py``.
* Loading a checkpoint saved after calibration (its config.json carries the GACConfig with its ``layout``)
  rebuilds the frozen quantized layers on the meta device before the weights load (``quant.convert.requantize``);
  quantizer state is loaded exactly, never cast to ``torch_dtype``. Once loaded, the layers run as the config's
  ``execution`` says (``quant.convert.set_execution``; ``"auto"`` unless ``from_pretrained`` got a
  ``GACConfig(execution=...)``, whose load-time options ``merge_quantization_configs`` below takes over).

The quantizer object a model carries (``model.hf_quantizer``) also holds the report of the calibration that
produced it (``calibration_report``), which ``diffusers_gac.save_pretrained`` and ``push_to_hub`` write beside the
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.utils import get_module_from_name, logging
from torch import nn

from .calibration.flow import calibrate
from .config import FORMAT_OPTIONS, GACConfig
from .integration import calibration_inputs
from .quant.convert import dequantize_model, requantize, set_execution

logger = logging.get_logger(__name__)

# State of quantized layers that must load bit-exact (codes) or unrounded (scales) whatever torch_dtype says.
QUANT_STATE_SUFFIXES = ("packed_weight", "quantizer.scale", "quantizer.zero_point", "quantizer.split")
# The calibration report, written beside a checkpoint by diffusers_gac.save_pretrained / push_to_hub.
REPORT_NAME = "gac_calibration.json"


class GACQuantizer(DiffusersQuantizer):
    requires_calibration = False  # a full-precision checkpoint is calibrated while it loads
    required_packages = None
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: GACConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_dir: Path | None = None
        self.calibration_report: dict[str, Any] | None = None

    def validate_environment(self, *args, **kwargs) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            raise ValueError("the gac backend loads a model onto one device; got a device_map spanning several")

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        return torch.float32 if torch_dtype is None else torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        # The only place the hooks learn where the checkpoint lives: calibration looks for the pipeline's scheduler.
        if checkpoint_files:
            self.checkpoint_dir = Path(checkpoint_files[0]).parent
        return loaded_keys

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        if self.pre_quantized:
            requantize(model, self.quantization_config)
        return model

    def check_if_quantized_param(self, model, param_value: torch.Tensor, param_name: str, state_dict: dict[str, Any],
                                 **kwargs) -> bool:
        return self.pre_quantized and param_name.endswith(QUANT_STATE_SUFFIXES)

    def check_quantized_param_shape(self, param_name: str, current_param, loaded_param) -> bool:
        if current_param.shape != loaded_param.shape:
            raise ValueError(
                f"{param_name}: the checkpoint has shape {tuple(loaded_param.shape)} but the quantization config "
                f"implies {tuple(current_param.shape)}; the checkpoint does not match its config.json"
            )
        return True

    def create_quantized_param(self, model, param_value: torch.Tensor, param_name: str, target_device, state_dict,
                               unexpected_keys=None, **kwargs) -> None:
        module, name = get_module_from_name(model, param_name)
        original = state_dict[param_name]  # before diffusers cast it to torch_dtype
        expected = getattr(module, name)
        if expected.shape != original.shape:
            self.check_quantized_param_shape(param_name, expected, original)
        module.register_buffer(name, original.to(device=target_device, dtype=expected.dtype))

    def update_missing_keys(self, model, missing_keys: list[str], prefix: str) -> list[str]:
        return missing_keys

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            config = dataclasses.replace(self.quantization_config)  # never the caller's object
            report = calibrate(model, config, **calibration_inputs(model, config, self.checkpoint_dir))
            config.layout = report.layout
            config.calibration_inputs = None  # the caller's tensors are not kept alive by the model
            self.quantization_config = config
            self.calibration_report = report.to_dict()
            model.register_to_config(quantization_config=config)
        else:
            chosen = set_execution(model, self.quantization_config.execution)
            logger.info(f"{len(chosen['integer'])} quantized layers run on integer kernels, {len(chosen['fake'])} as "
                        "fake quantization")
            if self.checkpoint_dir is not None and (self.checkpoint_dir / REPORT_NAME).is_file():
                self.calibration_report = json.loads((self.checkpoint_dir / REPORT_NAME).read_text())
        return model

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model):
        return dequantize_model(model)


def mark_calibrated(model: nn.Module, config: GACConfig, report: dict[str, Any] | None = None) -> None:
    """Give a model calibrated outside ``from_pretrained`` what the backend gives a loaded one: ``hf_quantizer``
    (holding the config and the calibration report) and the config in ``model.config``, so that diffusers'
    ``save_pretrained`` writes a checkpoint ``from_pretrained`` loads back and ``.half()``/``.to(dtype)`` refuse."""
    quantizer = GACQuantizer(config, pre_quantized=True)
    quantizer.calibration_report = report
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
    if hasattr(model, "register_to_config"):
        model.register_to_config(quantization_config=config)


def merge_quantization_configs(original):
    """Wrap diffusers' ``DiffusersAutoQuantizer.merge_quantization_configs`` (which keeps a checkpoint's own
    quantization config and drops the one passed to ``from_pretrained``) so that a ``GACConfig`` passed when loading
    a calibrated checkpoint still sets the load-time choice ``execution``. Format options always come from the
    checkpoint; those the caller set to something else are named in a warning."""

    def merge(cls, quantization_config, quantization_config_from_args):
        stored = quantization_config
        if isinstance(stored, dict) and stored.get("quant_method") == GACConfig.quant_method.value:
            stored = GACConfig.from_dict(stored)
        if not (isinstance(quantization_config_from_args, GACConfig) and isinstance(stored, GACConfig)):
            return original(cls, quantization_config, quantization_config_from_args)
        given = quantization_config_from_args
        stored.execution = given.execution
        default, theirs = GACConfig().to_dict(), stored.to_dict()
        ignored = [k for k, v in given.to_dict().items() if k in FORMAT_OPTIONS and v != default[k] and v != theirs[k]]
        if ignored:
            logger.warning(f"loading a calibrated checkpoint: its own {', '.join(ignored)} are used, not those passed "
                           "in quantization_config (only load-time options such as execution are taken from it)")
        return stored

    return merge
