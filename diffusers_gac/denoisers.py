"""What the backend can calibrate: the denoiser of a diffusion pipeline, in full precision, fed inputs it takes.

Each check raises a ``ValueError`` that says what was given and what would work, before any calibration starts.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)
# config keys giving the width of the prompt embeddings a denoiser takes, most specific first: a projection's input
# width (UNet encoder_hid_dim, PixArt caption_channels, SD3/Flux joint_attention_dim), else the attention's own
TEXT_WIDTH_KEYS = ("encoder_hid_dim", "caption_channels", "joint_attention_dim", "cross_attention_dim")


def forward_parameters(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def check_denoiser(model: nn.Module) -> None:
    """A diffusion denoiser: its forward takes a noisy ``sample`` (or ``hidden_states``) and a ``timestep``."""
    params = forward_parameters(model)
    if "timestep" not in params or not {"sample", "hidden_states"} & params:
        name = type(model).__name__
        raise ValueError(
            f"{name} is not a diffusion denoiser (its forward takes no timestep), and diffusers-gac calibrates only "
            "the denoiser of a diffusion pipeline (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, "
            f"Transformer2DModel, ...) on its own sampling trajectories; load {name} without GACConfig, or quantize it "
            "with another diffusers backend")


def check_not_quantized(model: nn.Module) -> None:
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        method = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
        method = getattr(method, "quant_method", None) or getattr(model, "quantization_method", None) or "a backend"
        method = getattr(method, "value", method)
        raise ValueError(
            f"{type(model).__name__} is already quantized (by {method}); calibrate its full-precision weights instead: "
            "load the model without quantization_config")


def check_full_precision(model: nn.Module) -> None:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    half = sorted(str(d) for d in dtypes if d in HALF_DTYPES)
    if half:
        raise ValueError(f"{type(model).__name__} holds {', '.join(half)} weights; calibration learns rounding and "
                         "ranges in float32: convert it with model.float() (or load it with torch_dtype=torch.float32) "
                         "first")


def text_embedding_width(model: nn.Module) -> tuple[int, str] | None:
    """The width of the prompt embeddings the denoiser takes, and the config key that says so (None: unknown)."""
    config = getattr(model, "config", None)
    if not hasattr(config, "get"):
        return None
    for key in TEXT_WIDTH_KEYS:
        value = config.get(key)
        if isinstance(value, (list, tuple)) and len(set(value)) == 1:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def check_prompt_embeds(model: nn.Module, prompt_embeds: torch.Tensor, name: str = "prompt_embeds") -> None:
    """Prompt embeddings the denoiser can take: it has ``encoder_hidden_states`` and their width is its own."""
    cls = type(model).__name__
    if "encoder_hidden_states" not in forward_parameters(model):
        raise ValueError(f"{cls} takes no prompt embeddings (its forward has no encoder_hidden_states); calibrate it "
                         f"without {name}")
    width = text_embedding_width(model)
    if width is not None and prompt_embeds.shape[-1] != width[0]:
        raise ValueError(
            f"{name} have width {prompt_embeds.shape[-1]} but {cls} takes prompt embeddings of width {width[0]} (its "
            f"{width[1]}); encode the prompts with the text encoder of the pipeline this denoiser belongs to")
