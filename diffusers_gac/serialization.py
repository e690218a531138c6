"""Rebuilding a calibrated model's layout from its config, and turning a quantized model back into a plain one.

A saved checkpoint is whatever ``state_dict()`` of a frozen model holds (see ``quant/layers.py`` for the exact
buffers of a layer): packed integer weights and quantizer ranges, no float copy of a converted weight. Its
config.json carries the ``GACConfig`` including ``converted_layers`` and ``quantized_attention``, from which
``build_frozen_layout`` recreates every quantized layer with buffers of the right names, shapes and dtypes
before the weights load.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from .config import GACConfig
from .quant.convert import ConversionReport, apply_conversion, quant_layers


def layout_of(config: GACConfig) -> ConversionReport:
    if not config.converted_layers:
        raise ValueError(
            "this checkpoint's quantization_config lists no converted_layers, so its quantized layers cannot be "
            "rebuilt; it was not saved by a calibrated diffusers-gac model"
        )
    return ConversionReport(layers=dict(config.converted_layers), attention=list(config.quantized_attention or []))


def build_frozen_layout(model: nn.Module, config: GACConfig) -> None:
    """Convert the (meta-device) model's layers as the config records and make them frozen placeholders."""
    apply_conversion(model, config, layout_of(config))
    for layer in quant_layers(model).values():
        layer.make_frozen_placeholder()


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a plain Conv2d/Linear holding its dequantized weight; activations and
    attention matmuls go back to full precision."""
    for name, layer in list(quant_layers(model).items()):
        weight = layer.quantized_weight().detach()
        if isinstance(layer, nn.Conv2d):
            plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                              padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                              bias=layer.bias is not None, padding_mode=layer.padding_mode, device=weight.device,
                              dtype=weight.dtype)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              device=weight.device, dtype=weight.dtype)
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    for module in model.modules():
        if isinstance(module, Attention) and hasattr(module, "probs_quantizer"):
            for q in ("q_quantizer", "k_quantizer", "v_quantizer", "probs_quantizer"):
                delattr(module, q)
            module.set_processor(AttnProcessor2_0())
    hook = getattr(model, "_gac_timestep_hook", None)
    if hook is not None:
        hook.remove()
        del model._gac_timestep_hook, model._gac_timestep_context
    internal = getattr(model, "_internal_dict", None)
    if internal is not None and "quantization_config" in internal:
        model._internal_dict = FrozenDict({k: v for k, v in internal.items() if k != "quantization_config"})
    return model


def mark_quantized(model: nn.Module, config: GACConfig) -> None:
    """Make a model calibrated outside ``from_pretrained`` look like one loaded through the "gac" backend, so that
    ``save_pretrained``/``push_to_hub`` write a checkpoint ``from_pretrained`` loads back, and ``.half()`` or
    ``.to(dtype)`` refuse."""
    from .quantizer import GACQuantizer

    model.hf_quantizer = GACQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    if hasattr(model, "register_to_config"):
        model.register_to_config(quantization_config=config)
    install_methods(model)


class InstalledMethod:
    """A method installed on one model instance: called like the class's method of the same name, with its
    signature (diffusers' pipelines inspect a component's ``save_pretrained`` to choose its arguments); survives
    ``copy.deepcopy`` and pickling, bound to the copy."""

    def __init__(self, func, model: nn.Module, name: str):
        self.func, self.model, self.name = func, model, name

    def __call__(self, *args, **kwargs):
        return self.func(self.model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        params = list(inspect.signature(getattr(type(self.model), self.name)).parameters.values())
        return inspect.Signature(params[1:])

    def __reduce__(self):
        return InstalledMethod, (self.func, self.model, self.name)


def install_methods(model: nn.Module) -> None:
    """Give a quantized model an atomic ``save_pretrained`` and a ``push_to_hub`` that uploads its model card."""
    from .hub import push_model_to_hub

    object.__setattr__(model, "save_pretrained", InstalledMethod(atomic_save_pretrained, model, "save_pretrained"))
    object.__setattr__(model, "push_to_hub", InstalledMethod(push_model_to_hub, model, "push_to_hub"))


def atomic_save_pretrained(self, save_directory, *args, **kwargs):
    """``ModelMixin.save_pretrained``, written into a temporary sibling folder and swapped in at the end: a save
    that fails or is interrupted leaves the previous folder (or none), never a partial checkpoint. Files the folder
    already held are kept, as diffusers keeps them."""
    if kwargs.get("push_to_hub") or not kwargs.get("is_main_process", True):
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    target = Path(save_directory)
    if target.is_file():
        raise ValueError(f"save_pretrained: {target} is a file, not a folder")
    replace_folder_atomically(target, lambda tmp: type(self).save_pretrained(self, tmp, *args, **kwargs),
                              keep_existing=True)


def replace_folder_atomically(target: Path, write, *, keep_existing: bool = False) -> None:
    """Run ``write(tmp)`` into a temporary sibling folder, then swap it in for ``target``: a write that fails or is
    interrupted leaves the previous ``target`` (or none), never a partial folder. With ``keep_existing`` the files
    ``target`` already holds are copied in first, so ``write`` adds to them."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    backup = target.with_name(f".{target.name}.previous-{tmp.name.rsplit('-', 1)[-1]}")
    try:
        if keep_existing and target.is_dir():
            shutil.copytree(target, tmp, dirs_exist_ok=True)
        write(tmp)
        if target.exists():
            os.replace(target, backup)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup.exists() and not target.exists():
            os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
