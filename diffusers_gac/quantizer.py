"""``GACQuantizer``: the diffusers loading hooks for the "gac" backend, and nothing else.

* Loading a full-precision checkpoint with ``quantization_config=GACConfig(...)`` calibrates after the weights
  are loaded (``_process_model_after_weight_loading``); calibration inputs come from ``integration.py``.
* Loading a checkpoint saved after calibration (its config.json carries the GACConfig with its ``layout``)
  rebuilds the frozen quantized layers on the meta device before the weights load (``quant.convert.requantize``);
  quantizer state is loaded exactly, never cast to ``torch_dtype``. Nothing loads unchecked: the layout against the
  model, the tensor names against the layout before any weight loads, each quantized tensor (dtype, shape, values)
  before it is used (``quant.checkpoint``). Once loaded, the layers run as the config's
  ``execution`` says (``quant.convert.set_execution``; ``"auto"`` unless ``from_pretrained`` got a
  ``GACConfig(execution=...)``, whose load-time options ``merge_quantization_configs`` below takes over).
* What cannot be calibrated is refused before any weight loads: a model that is no denoiser, half precision,
  calibration inputs that do not fit the model, a device this machine lacks.
* :func:`install_load_guard` makes a plain load (no quantization config) of diffusers-gac weights fail clearly
  instead of leaving the quantized layers with random weights.

The quantizer object a model carries (``model.hf_quantizer``) also holds the report of the calibration that
produced it (``calibration_report``), which ``diffusers_gac.save_pretrained`` and ``push_to_hub`` write beside the
checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import torch
from diffusers.models import model_loading_utils, modeling_utils
from diffusers.models.modeling_utils import ModelMixin
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.utils import get_module_from_name, logging
from torch import nn

from .calibration.flow import calibrate
from .checks import check_device
from .config import FORMAT_OPTIONS, GACConfig
from .denoisers import HALF_DTYPES, check_denoiser
from .integration import calibration_inputs, check_calibration_inputs
from .quant.checkpoint import (CheckpointError, check_layout, check_presence, check_tensor, looks_quantized,
                               quantized_tensor_specs)
from .quant.convert import dequantize_model, plan_conversion, requantize, set_execution
from .quant.digest import (DIGEST_KEY, DigestError, check_config, other_weight_files, read_header, state_dict_digest,
                           verify_files)

logger = logging.get_logger(__name__)

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
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
        self.loaded_keys: list[str] | None = None
        self.checkpoint_files: list[str] = []
        self.digest_record: dict[str, Any] | None = None  # what the checkpoint's files say was saved
        self.tensor_specs: dict = {}  # the quantized tensors a pre-quantized checkpoint must hold, by name

    def refuse(self, problems: list[str]) -> None:
        if problems:
            where = f"the checkpoint in {self.checkpoint_dir}" if self.checkpoint_dir else "the checkpoint"
            raise CheckpointError(problems, f"{where} does not match its quantization_config")

    def validate_environment(self, *args, **kwargs) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
            raise ValueError("the gac backend loads a model onto one device; got a device_map spanning several")
        devices = device_map.values() if isinstance(device_map, dict) else [] if device_map is None else [device_map]
        for device in devices:
            if not (isinstance(device, str) and device in DEVICE_MAP_STRATEGIES):
                check_device(device, "device_map")

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        if not self.pre_quantized and torch_dtype in HALF_DTYPES:
            raise ValueError(
                f"calibrating while loading needs float32 weights, got torch_dtype={torch_dtype}: rounding and ranges "
                "are learned in float32. Load with torch_dtype=torch.float32 (the default); the calibrated model then "
                "holds integer weight codes whatever the dtype, and its saved checkpoint loads in any torch_dtype")
        return torch.float32 if torch_dtype is None else torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        # The only place the hooks learn where the checkpoint lives (calibration looks for the pipeline's scheduler)
        # and which tensors it holds (checked against the layout before any weight loads).
        if checkpoint_files:
            self.checkpoint_dir = Path(checkpoint_files[0]).parent
        self.checkpoint_files = [str(f) for f in checkpoint_files or []]
        self.loaded_keys = list(loaded_keys)
        return loaded_keys

    def verify(self, files: list[str]) -> None:
        """The files hold the bytes that were saved with this config (``quant/digest.py``), checked before any
        weight is used; a checkpoint from before digests loads with a warning."""
        if not files:
            return
        if all(f.endswith(".safetensors") for f in files):
            self.digest_record = verify_files(files)
        others = other_weight_files(files)
        if others and self.digest_record is None:
            raise DigestError(f"{self.checkpoint_dir} holds two sets of weights: {', '.join(others)} beside the "
                              f"{', '.join(Path(f).name for f in files)} that loading picked, and none carries a digest "
                              "that ties it to this config.json; remove the set that is not this model's")
        if others:
            logger.warning(f"{self.checkpoint_dir}: loaded {', '.join(Path(f).name for f in files)}, whose digest "
                           f"matches; {', '.join(others)} beside it are left over from another save and were ignored")
        if self.digest_record is not None:
            return
        logger.warning(f"the checkpoint in {self.checkpoint_dir} carries no digest (it was written before diffusers-gac "
                       "recorded one, or not as safetensors), so its bytes cannot be checked against what was saved; "
                       "save it again with diffusers_gac.save_pretrained to add one")

    def get_state_dict_and_metadata(self, state_dict: dict[str, Any], safe_serialization: bool = False):
        # every save of a calibrated model (ours, diffusers' own, push_to_hub) records what it wrote
        if not safe_serialization:
            raise ValueError("a diffusers-gac checkpoint is saved as safetensors (safe_serialization=True, the "
                             "default): its files carry the digest that loading checks")
        return state_dict, {DIGEST_KEY: state_dict_digest(state_dict, self.quantization_config)}

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        config = self.quantization_config
        if self.pre_quantized:
            if config.layout is not None:
                check_layout(model, config)
            requantize(model, config)
            self.tensor_specs = quantized_tensor_specs(model)
            if self.loaded_keys is not None:
                self.refuse(check_presence(self.tensor_specs, self.loaded_keys))
                # tensors the rebuilt model does not save (a dynamic quantizer's empty range) but this checkpoint
                # holds load and are checked like the others: a static range under a config saying dynamic is refused
                for key in set(self.loaded_keys) & {k for k, spec in self.tensor_specs.items() if spec.optional}:
                    module, name = get_module_from_name(model, key)
                    module._non_persistent_buffers_set.discard(name)
            self.verify(self.checkpoint_files)
        else:  # what calibration would stumble on after the weights load, said now
            check_denoiser(model)
            plan_conversion(model, config)
            check_calibration_inputs(model, config)
        return model

    def check_if_quantized_param(self, model, param_value: torch.Tensor, param_name: str, state_dict: dict[str, Any],
                                 **kwargs) -> bool:
        return self.pre_quantized and param_name in self.tensor_specs

    def check_quantized_param_shape(self, param_name: str, current_param, loaded_param) -> bool:
        self.refuse(check_tensor(param_name, loaded_param, self.tensor_specs[param_name]))
        return True

    def create_quantized_param(self, model, param_value: torch.Tensor, param_name: str, target_device, state_dict,
                               unexpected_keys=None, **kwargs) -> None:
        original = state_dict[param_name]  # before diffusers cast it to torch_dtype
        self.refuse(check_tensor(param_name, original, self.tensor_specs[param_name]))
        module, name = get_module_from_name(model, param_name)
        expected = getattr(module, name)
        # an empty tensor is a dynamic quantizer's range, which the model does not save again (quantizers.py)
        module.register_buffer(name, original.to(device=target_device, dtype=expected.dtype),
                               persistent=original.numel() > 0)

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
            if self.digest_record is not None:  # after the per-tensor checks, which name a contradiction better
                check_config(self.digest_record, self.quantization_config, str(self.checkpoint_dir))
            chosen = set_execution(model, self.quantization_config.execution)
            logger.info(f"{len(chosen['integer'])} quantized layers run on integer kernels, {len(chosen['fake'])} as "
                        "fake quantization")
            if self.checkpoint_dir is not None and (self.checkpoint_dir / REPORT_NAME).is_file():
                try:  # a report beside the checkpoint documents it; a damaged one does not stop the model loading
                    self.calibration_report = json.loads((self.checkpoint_dir / REPORT_NAME).read_text())
                except (OSError, UnicodeDecodeError, ValueError) as err:
                    logger.warning(f"ignoring the calibration report {self.checkpoint_dir / REPORT_NAME}: it is not "
                                   f"readable JSON ({err}); the model loaded without it")
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


def refuse_unconfigured_weights(model: nn.Module, loaded_keys: list[str], where: str) -> None:
    """A plain load of weights that diffusers-gac quantized (config.json lost its quantization_config) would leave
    every quantized layer with random weights; refuse it, naming what was found."""
    own = set(model.state_dict())
    found = sorted(k for k in loaded_keys if looks_quantized(k) and k not in own)
    packed = [k for k in found if k.endswith("packed_weight")]
    if packed:
        raise ValueError(
            f"{where} holds diffusers-gac quantized weights ({len(found)} tensors such as {packed[0]!r}) but its "
            f"config.json has no quantization_config, so {type(model).__name__} would be left with random weights; "
            "restore the quantization_config that diffusers-gac saved in config.json (and import diffusers_gac)")


def install_load_guard() -> None:
    """Run :func:`refuse_unconfigured_weights` in every diffusers model load without a quantizer (diffusers has no
    hook for it: its loader is wrapped once, in place, like the backend tables ``diffusers_gac`` extends)."""
    current = ModelMixin.__dict__.get("_load_pretrained_model")
    if not isinstance(current, classmethod) or getattr(current.__func__, "_gac_guard", False):
        return
    load = current.__func__

    @functools.wraps(load)
    def guarded(cls, model, state_dict, resolved_model_file, pretrained_model_name_or_path, loaded_keys, *args,
                **kwargs):
        if kwargs.get("hf_quantizer") is None and loaded_keys:
            refuse_unconfigured_weights(model, loaded_keys, str(pretrained_model_name_or_path))
        return load(cls, model, state_dict, resolved_model_file, pretrained_model_name_or_path, loaded_keys, *args,
                    **kwargs)

    guarded._gac_guard = True
    ModelMixin._load_pretrained_model = classmethod(guarded)
    for module in (modeling_utils, model_loading_utils):  # the two places diffusers reads a weights file from
        module.load_state_dict = explain_unreadable(module.load_state_dict)


def explain_unreadable(read):
    """Wrap diffusers' ``load_state_dict`` so that a safetensors file it cannot read (truncated, empty, bytes appended,
    a broken header) gets an error naming the file and what is wrong, instead of "Unable to load weights"."""
    if getattr(read, "_gac_guard", False):
        return read

    @functools.wraps(read)
    def explained(checkpoint_file, *args, **kwargs):
        try:
            return read(checkpoint_file, *args, **kwargs)
        except (OSError, ValueError) as err:
            path = Path(str(checkpoint_file))
            if path.suffix == ".safetensors" and path.is_file():
                read_header(path)  # raises DigestError saying what is wrong with the file, if it finds it
            raise err

    explained._gac_guard = True
    return explained
