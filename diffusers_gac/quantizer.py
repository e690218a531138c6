"""``GACQuantizer``: the diffusers loading hooks for the "gac" backend, and nothing else.

* Loading a full-precision checkpoint with ``quantization_config=GACConfig(...)`` calibrates after the weights
  are loaded (``_process_model_after_weight_loading``); the scheduler comes from the config, from the pipeline
  folder the model sits in, or is DDIM over diffusers' default linear schedule.
* Loading a checkpoint saved after calibration (its config.json carries the GACConfig with the list of converted
  layers) rebuilds the frozen quantized layers on the meta device before the weights load; quantizer state is
  loaded exactly, never cast to ``torch_dtype``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.utils import get_module_from_name, logging

from .config import GACConfig

logger = logging.get_logger(__name__)

# State of quantized layers that must load bit-exact (codes) or unrounded (scales) whatever torch_dtype says.
QUANT_STATE_SUFFIXES = ("packed_weight", "quantizer.scale", "quantizer.zero_point", "quantizer.split")


class GACQuantizer(DiffusersQuantizer):
    requires_calibration = False  # a full-precision checkpoint is calibrated while it loads
    required_packages = None
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: GACConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_dir: Path | None = None

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
            from .serialization import build_frozen_layout

            build_frozen_layout(model, self.quantization_config)
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
            from .integration import calibrate_loaded_model

            calibrate_loaded_model(model, self.quantization_config, checkpoint_dir=self.checkpoint_dir)
        else:
            from .hub import REPORT_NAME
            from .serialization import install_methods

            report = self.checkpoint_dir / REPORT_NAME if self.checkpoint_dir else None
            if report is not None and report.is_file():  # uploaded beside the checkpoint by diffusers_gac.push_to_hub
                model._gac_calibration_report = json.loads(report.read_text())
            install_methods(model)
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
        from .serialization import dequantize_model

        return dequantize_model(model)
