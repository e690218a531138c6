"""Turn the Conv2d and Linear layers of a diffusers denoiser into quantized layers.

Which layers, at which bits:
* every ``nn.Conv2d`` and ``nn.Linear`` except those named (or prefixed) in ``modules_to_not_convert``;
* the "special" layers (the first layer, the last layer and the timestep/class embedding MLPs) at
  ``special_bits`` for weights and inputs, or left in full precision when ``special_bits`` is None;
* the 1x1 shortcut convolution of an up-block ResNet, whose input is ``cat([up_features, skip])``, gets a split
  input quantizer when ``split_skip_inputs`` is set.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from ..config import EXECUTIONS, GACConfig, QuantizedLayout, check_choice
from . import intexec
from .attention import adopt_attention_modules, quantize_attention
from .layers import QUANT_LAYERS, QuantConv2d, QuantLayerMixin, QuantLinear
from .levers import float_weight, layer_rank
from .quantizers import ActQuantizer, TimestepContext

# Names of the first/last layers and of the embedding MLPs across diffusers' UNets and transformer denoisers.
FIRST_LAST_LAYERS = ("conv_in", "conv_out", "pos_embed.proj", "proj_out", "proj_out_1", "proj_out_2", "proj_in")
EMBEDDING_MARKERS = ("time_embedding", "timestep_embedder", "class_embedding", "class_embedder", "add_embedding",
                     "time_embed", "adaln_single.linear")


def is_special_layer(name: str) -> bool:
    """First/last layers and the timestep embedding (kept at higher precision by default)."""
    if name in FIRST_LAST_LAYERS:
        return True
    return any(marker in name for marker in EMBEDDING_MARKERS)


def _matches(name: str, patterns: list[str] | None) -> bool:
    return any(name == p or name.startswith(p + ".") for p in patterns or [])


def skip_join_splits(model: nn.Module) -> dict[str, int]:
    """For every up-block ResNet whose input concatenates up-path features and a skip, the number of up-path
    channels, keyed by the name of its shortcut convolution (the layer that sees the raw concatenation)."""
    up_blocks = getattr(model, "up_blocks", None)
    if up_blocks is None:
        return {}
    prev = None  # channels entering the current up block
    if getattr(model, "mid_block", None) is not None and hasattr(model.mid_block, "resnets"):
        prev = model.mid_block.resnets[-1].out_channels
    elif getattr(model, "down_blocks", None) is not None and len(model.down_blocks):
        prev = model.down_blocks[-1].resnets[-1].out_channels
    splits = {}
    for j, block in enumerate(up_blocks):
        for i, resnet in enumerate(getattr(block, "resnets", [])):
            hidden = prev if i == 0 else block.resnets[i - 1].out_channels
            shortcut = getattr(resnet, "conv_shortcut", None)
            if hidden is not None and isinstance(shortcut, nn.Conv2d) and 0 < hidden < shortcut.in_channels:
                splits[f"up_blocks.{j}.resnets.{i}.conv_shortcut"] = hidden
        if len(getattr(block, "resnets", [])):
            prev = block.resnets[-1].out_channels
    return splits


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def check_modules_to_not_convert(model: nn.Module, patterns: list[str] | None) -> None:
    """Every entry names a module of the model (or a prefix of module names): a typo must not convert a layer the
    user meant to keep in full precision."""
    names = [n for n, _ in model.named_modules() if n]
    unmatched = [p for p in patterns or [] if not any(_matches(n, [p]) for n in names)]
    if unmatched:
        top = sorted({n.split(".")[0] for n in names})
        raise ValueError(f"modules_to_not_convert names no module of {type(model).__name__}: "
                         f"{', '.join(repr(p) for p in unmatched)}; it takes module names or their prefixes, such as "
                         f"{', '.join(repr(t) for t in top[:8])}")


def plan_conversion(model: nn.Module, config: GACConfig) -> QuantizedLayout:
    """Decide which layers to convert and how, without touching the model."""
    check_modules_to_not_convert(model, config.modules_to_not_convert)
    report = QuantizedLayout()
    splits = skip_join_splits(model) if config.split_skip_inputs else {}
    for name, module in model.named_modules():
        if type(module) not in QUANT_LAYERS:
            continue
        if _matches(name, config.modules_to_not_convert):
            continue
        w_bits, a_bits = config.w_bits, config.a_bits
        if is_special_layer(name):
            if config.special_bits is None:
                continue
            w_bits = max(w_bits, config.special_bits)
            a_bits = None if a_bits is None else max(a_bits, config.special_bits)
        split = splits.get(name) if isinstance(module, nn.Conv2d) else None
        report.layers[name] = {"w_bits": w_bits, "a_bits": a_bits, "split": split}
        if config.lowrank_rank and not is_special_layer(name) and getattr(module, "groups", 1) == 1:
            rank = layer_rank(tuple(module.weight.shape), config.lowrank_rank)
            if rank:
                report.layers[name]["rank"] = rank
    if config.attn_bits is not None:
        report.attention = [
            n for n, m in model.named_modules() if isinstance(m, Attention) and not _matches(n, config.modules_to_not_convert)
        ]
    if not report.layers:  # a quantized model with nothing quantized would be a float model under a W4A4 card
        why = (f"modules_to_not_convert={config.modules_to_not_convert!r} leaves" if config.modules_to_not_convert
               else "special_bits=None leaves" if config.special_bits is None else "there is")
        raise ValueError(f"{why} no Conv2d or Linear layer of {type(model).__name__} to quantize; keep fewer modules "
                         "in full precision")
    return report


def apply_conversion(model: nn.Module, config: GACConfig, plan: QuantizedLayout) -> None:
    """Replace the planned layers in place by quantized layers (on the layers' device, meta included) and install
    the hook that tells ``timestep``-scheme quantizers the timestep of each sample."""
    for name, spec in plan.layers.items():
        module = model.get_submodule(name)
        if type(module) not in QUANT_LAYERS:
            raise ValueError(f"cannot convert {name!r}: expected Conv2d or Linear, found {type(module).__name__}")
        plain = getattr(module, "groups", 1) == 1  # smoothing and the branch need dense weights
        layer = QUANT_LAYERS[type(module)].from_module(
            module, w_bits=spec["w_bits"], a_bits=spec["a_bits"], weight_init=config.weight_init,
            act_scheme=config.act_scheme, act_groups=config.act_timestep_groups, split=spec["split"],
            group_size=config.act_group_size, clipping=config.act_clipping, smoothing=config.smoothing and plain,
            rank=spec.get("rank", 0), rank_bits=config.lowrank_bits,
        )
        _set_module(model, name, layer)
    if plan.attention:
        quantize_attention(model, config.attn_bits, plan.attention, config.act_scheme, config.act_timestep_groups)
    adopt_attention_modules(model)  # diffusers' fuse_qkv_projections() then fuses quantized projections
    if config.act_scheme == "timestep" and (config.a_bits is not None or config.attn_bits is not None):
        attach_timestep_context(model, config.act_timestep_groups)


def convert_model(model: nn.Module, config: GACConfig) -> QuantizedLayout:
    """Replace the model's Conv2d/Linear layers in place by quantized layers as the config says."""
    plan = plan_conversion(model, config)
    apply_conversion(model, config, plan)
    return plan


def quant_layers(model: nn.Module) -> dict[str, QuantLayerMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def float_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear layers still in full precision."""
    return [n for n, m in model.named_modules() if type(m) in QUANT_LAYERS]


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def _timestep_from_call(args: tuple, kwargs: dict):
    if "timestep" in kwargs:
        return kwargs["timestep"]
    if "timesteps" in kwargs:
        return kwargs["timesteps"]
    return args[1] if len(args) > 1 else None


def attach_timestep_context(model: nn.Module, num_groups: int) -> TimestepContext:
    """Share one ``TimestepContext`` between the model's quantizers, refreshed before every model call."""
    num_train = getattr(getattr(model, "config", None), "num_train_timesteps", None) or 1000
    context = TimestepContext(num_groups, num_train)
    for q in act_quantizers(model):
        q.context = context

    def pre_hook(module, args, kwargs):
        t = _timestep_from_call(args, kwargs)
        if t is not None:
            context.set_timesteps(t)

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model._gac_timestep_context = context
    model._gac_timestep_hook = handle
    return context


def set_quant_state(module: nn.Module, weights: bool = True, acts: bool = True) -> None:
    """Switch weight and activation quantization below ``module`` on or off (all off = the FP model)."""
    for layer in quant_layers(module).values():
        layer.quantize_weight = weights
    for q in act_quantizers(module):
        q.enabled = acts


class quantization_disabled:
    """Context manager: run the model in full precision (converted layers keep their original weights until
    ``freeze_model``)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.layers, self.quantizers = quant_layers(self.model), act_quantizers(self.model)
        self.saved = ([l.quantize_weight for l in self.layers.values()], [q.enabled for q in self.quantizers])
        set_quant_state(self.model, weights=False, acts=False)
        return self.model

    def __exit__(self, *exc):
        for layer, on in zip(self.layers.values(), self.saved[0]):
            layer.quantize_weight = on
        for q, on in zip(self.quantizers, self.saved[1]):
            q.enabled = on
        return False


@torch.no_grad()
def freeze_model(model: nn.Module, execution: str | None = None, float16: bool = True) -> None:
    """Harden every layer's rounding into its weight (the model then holds 2^bits-level weights) and store every
    activation step as it is used (``|scale|``, at least 1e-8: a learned step may have crossed zero), so that a
    checkpoint's scales are all positive. With ``float16`` (the default), the quantized layers' biases, weight scales
    and static input scales are rounded to float16 values and saved as float16 (``QuantLayerMixin.freeze``); the
    outputs change by that rounding only. With ``execution``, then choose how the frozen layers run (see
    :func:`set_execution`)."""
    for layer in quant_layers(model).values():
        layer.freeze(float16)
    for q in act_quantizers(model):
        q.scale.abs_().clamp_min_(1e-8)
    if execution is not None:
        set_execution(model, execution)


@torch.no_grad()
def set_execution(model: nn.Module, execution: str = "auto", int4_storage: str = "packed") -> dict[str, list[str]]:
    """Choose how the frozen quantized layers of ``model`` run; returns the layer names per mode as they run now.

    ``"fake"``: the reference (dequantize the weight, float conv/linear on fake-quantized inputs). ``"integer"``: int8
    GEMMs (``quant/intexec.py``) for every layer with quantized inputs. ``"auto"``: ``"integer"`` for the layers wide
    enough to gain from it (``intexec.integer_pays_off``), ``"fake"`` for the others; on a GPU, per layer and input
    shape, the fastest of the integer kernels, the reference computed densely in the input's dtype and (bfloat16
    linear layers and 1x1 convolutions of at most 4 bits) a float8 GEMM (timed on first use,
    ``gpuauto.choose_path``). Integer execution holds while a layer sits on a device with the kernels
    (``intexec.integer_kernels_available``: the CPU with oneDNN, CUDA GPUs with int8 tensor cores); moved elsewhere
    it runs the reference, and moved back, the kernels again. ``int4_storage``: how weights of
    4 bits or fewer stay resident in integer mode, ``"packed"`` (two per byte, unpacked per call), ``"int8"`` (one
    per byte) or ``"fp8"`` (one per byte, as float8 on GPUs with float8 tensor cores, which multiply inputs of at
    most 4 bits as float8, exactly; int8 elsewhere; experimental, see ``intexec``). Checkpoints and results do not
    depend on the mode beyond float rounding (docs/index.md, Inference)."""
    check_choice("execution", execution, EXECUTIONS)
    check_choice("int4_storage", int4_storage, intexec.INT4_STORAGES)
    chosen: dict[str, list[str]] = {"integer": [], "fake": []}
    for name, layer in quant_layers(model).items():
        if not layer.frozen:
            raise ValueError(f"{name} is not frozen: calibrate (or freeze_model) before choosing an execution")
        chosen["integer" if layer.set_execution(execution, int4_storage) else "fake"].append(name)
    return chosen


def requantize(model: nn.Module, config: GACConfig) -> None:
    """Rebuild a calibrated model's quantized layers from its config, as frozen placeholders whose buffers have the
    checkpoint's names, shapes and dtypes (on the model's device, meta included), ready for the weights to load."""
    if config.layout is None or not config.layout.layers:
        raise ValueError(
            "this checkpoint's quantization_config has no layout (the list of converted layers), so its quantized "
            "layers cannot be rebuilt; it was not saved by a model calibrated with diffusers-gac"
        )
    apply_conversion(model, config, config.layout)
    for layer in quant_layers(model).values():
        layer.make_frozen_placeholder()
    for module in model.modules():  # a dynamic quantizer's empty range is not saved, so nothing loads it: not meta
        if isinstance(module, ActQuantizer) and module.scale.numel() == 0 and module.scale.is_meta:
            module.scale, module.zero_point = torch.ones(0), torch.zeros(0)


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a plain Conv2d/Linear holding its dequantized weight; activations and
    attention matmuls go back to full precision, and the quantization config leaves the model's config."""
    for name, layer in list(quant_layers(model).items()):
        weight = float_weight(layer, layer.quantized_weight().detach())
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
        _set_module(model, name, plain)
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
