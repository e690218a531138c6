"""Time per denoising step: full precision, fake quantization and the integer path, in one process.

Every variant of a model is built before timing starts and the variants run round-robin (FP32, fake, W8A8, ...,
FP32, fake, ...) so that load from other jobs on the machine hits them alike; the table reports medians and the
ratio FP32 / variant. One step is one forward of the denoiser on ``--batch`` samples.

Models:

* ``embedded``: the embedded digits ``UNet2DModel`` (8x8, class-conditional);
* ``sd``: a randomly initialised ``UNet2DConditionModel`` with Stable Diffusion 1.5's blocks (320/640/1280/1280
  channels, two layers per block, 8 heads, 77 text tokens of 768) at latent size ``--latents``; ``--sd-channels``
  shrinks it for a smoke test.

Quantized variants are converted with the library's defaults (dynamic per-token activations, first/last layer and
embeddings at 8 bits) and round-to-nearest weights: speed does not depend on how the rounding was learned, so
nothing is calibrated. ``fake`` runs the fake-quant reference (dequantize, float ops); ``int`` the integer kernels
for every layer with quantized inputs (``execution="integer"``); ``auto`` the integer kernels for the layers wide
enough to gain from them, fake quantization for the others (``execution="auto"``, the default when loading).
"weights resident" sums the model's parameters and buffers, "state dict as saved" the tensors its checkpoint would
hold (compact dtypes: packed codes, float16 scales, int8 factor codes); "step peak" is how far one step raises the process's
resident memory (Linux peak RSS, reset before the step); "rel. L2 vs FP32" is a sanity check of each output.

    python benchmarks/inference_speed.py --models embedded sd --latents 16 32 64 --threads 2 --output docs/results/inference_speed.md
    python benchmarks/inference_speed.py --json          # SD-sized UNet at latent 32: one JSON object
    python benchmarks/inference_speed.py --models sd --device cuda --latents 128 64 --batch 2 1 4   # a GPU's table

On a GPU (``--device cuda``) the default variants are the bfloat16 ones users run (``GPU_VARIANTS``), every variant
is built once and timed at every size, and ``graph_*`` variants capture one step per size as a CUDA graph.

On a machine shared with other jobs, ``--threads 1 --clock cpu`` (process CPU time) gives stable ratios; wall-clock
timing with several threads then waits for descheduled threads. The allocator's settings move the integer kernels'
times more than bf16's (they allocate more temporaries), so the report names them (``report.malloc_line``). The docs'
tables are taken with glibc's defaults, the settings users run with; ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...``
fixes the mmap threshold but also stops glibc from raising its trim threshold, so freed temporaries are handed back
to the system and faulted in again on the next call.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as dlogging
from torch import nn

from diffusers_gac import GACConfig
from diffusers_gac.calibration.data import CalibrationData
from diffusers_gac.calibration.flow import observe_activation_ranges
from diffusers_gac.quant import gpuauto, gpukernels, intexec
from diffusers_gac.quant.convert import convert_model, freeze_model, quant_layers, set_execution
from diffusers_gac.quant.quantizers import ActQuantizer, WeightQuantizer
from diffusers_gac.zoo import load_embedded_unet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp_baseline import cpu_name  # noqa: E402  (benchmarks/fp_baseline.py)
from peers import PEERS, build_peer  # noqa: E402  (benchmarks/peers.py)
import report  # noqa: E402  (benchmarks/report.py)

# the activation-side levers (GACConfig options) of the *_levers*/*_g64 variants: smoothing, a rank-32 branch (float16
# or int8 factors) and clipped ranges beside the integer kernels; per-group ranges (act_group_size) as one int8 GEMM
# per channel group (and kernel tap)
LEVERS = {"smoothing": True, "lowrank_rank": 32, "act_clipping": True}
VARIANTS = {  # name -> (execution, peer or None for float, w_bits, a_bits[, GACConfig options])
    "fp32": (None, None, None),
    "bf16": ("bf16", None, None),
    "fake_w4a4": ("fake", 4, 4),
    "fake_w8a8": ("fake", 8, 8),
    "int_w8a8": ("integer", 8, 8),
    "int_w4a8": ("integer", 4, 8),
    "int_w4a4": ("integer", 4, 4),
    "int_w4a4_int8": ("integer", 4, 4),  # 4-bit weights resident as int8 carriers (int4_storage, STORAGES)
    "int_w4a4_fp8": ("integer", 4, 4),  # ... as float8 carriers: float8 tensor cores on a GPU that has them
    "auto_w4a4": ("auto", 4, 4),
    "dense_w4a4": ("auto", 4, 4),  # "auto" with every layer pinned to the dense path on a GPU (PINNED)
    "scaled_w4a4": ("auto", 4, 4),  # ... to the float8 path where it serves the layer, else the integer kernels
    "scaled_w4a4_fp8": ("auto", 4, 4),  # ... with the weights resident as float8 carriers (no per-call conversion)
    "int_w4a4_levers": ("integer", 4, 4, LEVERS),
    "int_w4a4_levers8": ("integer", 4, 4, {**LEVERS, "lowrank_bits": 8}),
    "int_w4a4_g64": ("integer", 4, 4, {"act_group_size": 64}),
    # precomputed activation ranges (the paper's static setting), observed on the timed input: no per-token min/max
    "int_w8a8_static": ("integer", 8, 8, {"act_scheme": "static"}),
    "int_w4a8_static": ("integer", 4, 8, {"act_scheme": "static"}),
    "int_w4a4_static": ("integer", 4, 4, {"act_scheme": "static"}),
    "int_w4a4_timestep": ("integer", 4, 4, {"act_scheme": "timestep"}),
    "torchao_w8a8": ("torchao", 8, 8),
    "quanto_w8a8": ("quanto", 8, 8),
    "quanto_w4a8": ("quanto", 4, 8),
    "bnb_nf4": ("bnb-nf4", 4, None),
}
STORAGES = {"int_w4a4_int8": "int8", "int_w4a4_fp8": "fp8", "scaled_w4a4_fp8": "fp8"}  # int4_storage, else "packed"
PINNED = {"dense_w4a4": "dense", "scaled_w4a4": "scaled", "scaled_w4a4_fp8": "scaled"}  # gpuauto.pin_path, untimed
DEFAULT_VARIANTS = ["fp32", "bf16", "fake_w4a4", "int_w8a8", "int_w4a8", "int_w4a4", "auto_w4a4"]
PEER_VARIANTS = ["torchao_w8a8", "quanto_w8a8", "quanto_w4a8", "bnb_nf4"]
# Prefixes, outermost first: "compiled_" (torch.compile), "graph_" (one step captured as a CUDA graph and replayed),
# "fused_" (diffusers' model.fuse_qkv_projections(): one q/k/v projection per attention module, quantized ones
# through diffusers_gac), "cl_" (diffusers' unet.to(memory_format=torch.channels_last), the sample input channels-last
# too), "bf16_" (the model in bfloat16 as users load it: a quantized model's layers take and return bfloat16, their
# quantizer state stays float32, as a torch_dtype=torch.bfloat16 load leaves it; a peer built on the bfloat16 model).
PREFIXES = ("compiled_", "graph_", "fused_", "cl_", "bf16_")
ALIASES = {"compiled_w4a4": "compiled_auto_w4a4"}
GPU_VARIANTS = ["fp32", "bf16", "bf16_fake_w4a4", "bf16_int_w8a8", "bf16_int_w4a8", "bf16_int_w4a4",
                "bf16_auto_w4a4", "graph_bf16", "graph_bf16_int_w8a8", "graph_bf16_int_w4a4", "bf16_bnb_nf4"]


def split_variant(name: str) -> tuple[list[str], str]:
    """``"graph_bf16_int_w4a4"`` -> (["graph_", "bf16_"], "int_w4a4"); ``"bf16"`` is a base variant itself."""
    name = ALIASES.get(name, name)
    prefixes = []
    while name not in VARIANTS:
        prefix = next((p for p in PREFIXES if name.startswith(p) and p not in prefixes), None)
        if prefix is None:
            raise ValueError(name)
        prefixes.append(prefix)
        name = name[len(prefix):]
    return prefixes, name


def variant_name(name: str) -> str:
    """argparse type: a base variant with optional prefixes."""
    try:
        prefixes, base = split_variant(name)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown variant {name!r}: a base variant ({', '.join(VARIANTS)}) with optional prefixes "
            f"{', '.join(PREFIXES)} (in that order), e.g. graph_bf16_int_w4a4") from None
    if "bf16_" in prefixes and base in ("fp32", "bf16"):
        raise argparse.ArgumentTypeError(f"{name!r}: use 'bf16' for the bfloat16 float model")
    return name


BUILT: dict[tuple[int, str], nn.Module] = {}  # on a GPU, variants built once and timed at every size
SKIPPED: list[str] = []  # variants that failed to build, with why
CHOICES: list[str] = []  # the paths "auto" variants chose on a GPU, per size
PROFILES: list[str] = []  # --profile tables
SD_CHANNELS = (320, 640, 1280, 1280)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def sd_unet(channels: tuple[int, ...], cross_attention_dim: int) -> UNet2DConditionModel:
    """Stable Diffusion 1.5's UNet architecture (diffusers' defaults are SD's blocks), random weights."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, block_out_channels=tuple(channels),
                                layers_per_block=2, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=8).eval()


def model_inputs(model: nn.Module, latent: int, batch: int, tokens: int = 77, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    call = {"sample": torch.randn(batch, cfg.in_channels, latent, latent, generator=g),
            "timestep": torch.full((batch,), 500)}
    if getattr(cfg, "num_class_embeds", None):
        call["class_labels"] = torch.arange(batch) % cfg.num_class_embeds
    if getattr(cfg, "cross_attention_dim", None):
        call["encoder_hidden_states"] = torch.randn(batch, tokens, cfg.cross_attention_dim, generator=g)
    return {k: v.to(device) for k, v in call.items()}


def to_half(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a (quantized) model's float parameters and buffers to ``dtype``, leaving the quantizers' scales and zero
    points and the integer layouts' float terms in float32: what ``from_pretrained(..., torch_dtype=dtype)`` of a
    calibrated checkpoint gives."""
    for module in model.modules():
        if isinstance(module, (WeightQuantizer, ActQuantizer)):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and not name.startswith("int_"):
                setattr(module, name, b.to(dtype))
    return model


class CudaGraphed(nn.Module):
    """One step of ``model`` on fixed inputs, captured as a CUDA graph at the first call and replayed after: what a
    launch-bound step costs without the CPU's launch overhead (``torch.cuda.graphs``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_out: torch.Tensor | None = None

    def forward(self, **call):
        if self.graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up (Triton compiles, cuBLAS picks kernels) outside the capture
                    self.model(**call)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            self.static_call = call
            with torch.cuda.graph(self.graph):
                self.static_out = self.model(**call)[0]
        for k, v in call.items():
            if v is not self.static_call[k]:
                self.static_call[k].copy_(v)
        self.graph.replay()
        return (self.static_out,)


def variant_dtype(name: str) -> torch.dtype:
    prefixes, base = split_variant(name)
    return torch.bfloat16 if base == "bf16" or "bf16_" in prefixes else torch.float32


def variant_channels_last(name: str) -> bool:
    return "cl_" in split_variant(name)[0]


def variant_forward(model: nn.Module, call: dict, name: str) -> Callable[[], torch.Tensor]:
    """``forward_fn`` with the inputs variant ``name`` takes (its dtype and memory format)."""
    return forward_fn(model, call, variant_dtype(name), variant_channels_last(name))


def build_variant(fp32: nn.Module, name: str, call: dict) -> nn.Module:
    name = ALIASES.get(name, name)
    prefixes, base = split_variant(name)
    if prefixes:
        inner = build_variant(fp32, name[len(prefixes[0]):], call)
        if prefixes[0] == "compiled_":
            if base.startswith("auto") and next(fp32.parameters()).is_cuda:  # "auto" times its paths in eager calls
                variant_forward(inner, call, name)()  # only: one step first, whose choices compile takes
            return torch.compile(inner)
        if prefixes[0] == "fused_":
            if inner is fp32:  # the reference itself: fuse a copy
                inner = copy.deepcopy(inner)
            if not hasattr(inner, "fuse_qkv_projections"):
                raise RuntimeError(f"{type(inner).__name__} has no fuse_qkv_projections()")
            inner.fuse_qkv_projections()
            return inner
        if prefixes[0] == "cl_":
            return (copy.deepcopy(inner) if inner is fp32 else inner).to(memory_format=torch.channels_last)
        if prefixes[0] == "graph_":
            if not next(fp32.parameters()).is_cuda:
                raise RuntimeError("CUDA graphs need --device cuda")
            return CudaGraphed(inner)
        dtype = torch.bfloat16  # "bf16_"
        half_call = {k: v.to(dtype) if v.is_floating_point() else v for k, v in call.items()}
        if VARIANTS[base][0] in PEERS:
            return build_variant(to_half(copy.deepcopy(fp32), dtype), base, half_call)
        return to_half(build_variant(fp32, base, call), dtype)
    kind, w_bits, a_bits, *options = VARIANTS[base]
    if kind is None:
        return fp32
    if kind in PEERS:
        bits = f"W{w_bits}A{a_bits or 16}"
        model, mean_bits = build_peer(kind, bits, fp32, lambda m: m(**call))  # calibrated on the timed input
        log(f"{name}: {mean_bits:.1f} bits per Linear/Conv2d weight")
        return model
    model = copy.deepcopy(fp32)
    if kind == "bf16":
        return model.to(torch.bfloat16)
    config = GACConfig(w_bits=w_bits, a_bits=a_bits, weight_init="minmax", **(options or [{}])[0])
    convert_model(model, config)
    if config.act_scheme != "dynamic":  # ranges observed on the timed input, as calibration would set them
        inputs = {k: v for k, v in call.items() if torch.is_tensor(v)}
        data = CalibrationData(inputs=inputs, step_index=torch.zeros(len(call["sample"]), dtype=torch.long),
                               static={k: v for k, v in call.items() if not torch.is_tensor(v)})
        observe_activation_ranges(model, data, batch_size=len(data))
    freeze_model(model, kind)
    if base in STORAGES:
        set_execution(model, kind, STORAGES[base])
    if base in PINNED:
        gpuauto.pin_path(model, PINNED[base])
    layers = quant_layers(model).values()
    running = sum(m.execution == "integer" for m in layers)
    wanted = {"fake": 0, "integer": sum(intexec.integer_support(m) is None for m in layers)}
    if any(intexec.layer_device(m).type != "cpu" for m in layers):  # a GPU also refuses some (gpuexec.dense_support)
        del wanted["integer"]
    if running != wanted.get(kind, running):
        raise RuntimeError(f"{name}: {running} of {wanted[kind]} layers run the integer kernels")
    log(f"{name}: {running} of {len(layers)} quantized layers on the integer kernels")
    return model


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def step_peak_mib(fn: Callable[[], object]) -> float | None:
    """How far one call raises the process's resident memory above what it held before (activations, workspaces,
    dequantized weights): Linux's peak RSS, reset just before the call (``/proc/self/clear_refs``), after glibc has
    given back the memory it kept from earlier calls (``malloc_trim``)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: the inner tensors of a tensor subclass (torchao, quanto), a bitsandbytes 4-bit weight's
    packed data plus its block scales."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n), torch.Tensor))
    size = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)
    absmax = getattr(state, "absmax", None)
    return size + (absmax.numel() * absmax.element_size() if isinstance(absmax, torch.Tensor) else 0)


def release_memory(reset_compiled: bool = True) -> None:
    """Drop compiled graphs and hand freed memory back to the system (glibc keeps it otherwise): the variants of an
    860M-parameter model fit in 24 GB only so."""
    if reset_compiled:
        torch._dynamo.reset()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cuda_step_peak_mib(fn: Callable[[], object]) -> float:
    """How far one call raises the CUDA memory allocated (PyTorch's caching allocator)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def resident_mib(model: nn.Module) -> float:
    tensors = list(model.parameters()) + [b for _, b in model.named_buffers()]
    return sum(tensor_bytes(t) for t in tensors) / 2**20


def saved_mib(model: nn.Module) -> float | None:
    """What the model's state dict holds as saved (a quantized model's compact dtypes: packed codes, float16 scales,
    int8 factor codes); None where a peer's state dict cannot be measured this way."""
    try:
        return sum(tensor_bytes(t) for t in model.state_dict().values()) / 2**20
    except Exception:  # a peer's tensor subclass without plain storage
        return None


def forward_fn(model: nn.Module, call: dict, dtype: torch.dtype = torch.float32,
               channels_last: bool = False) -> Callable[[], torch.Tensor]:
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in call.items()}
    if channels_last:
        cast = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in cast.items()}
    cuda = next(iter(call.values())).device.type == "cuda"

    def run() -> torch.Tensor:
        with torch.no_grad():  # not inference_mode: optimum-quanto's frozen tensors refuse it
            out = model(**cast, return_dict=False)[0].float()
        if cuda:
            torch.cuda.synchronize()  # the step is done when its kernels are
        return out

    return run


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int, clock: Callable[[], float]
                ) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``rounds`` samples each, candidates alternating."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            start = clock()
            fn()
            samples[k].append(clock() - start)
    return samples


def measure(label: str, fp32: nn.Module, latent: int, args: argparse.Namespace, batch: int) -> list[dict]:
    fp32 = fp32.to(args.device)
    call = model_inputs(fp32, latent, batch, device=args.device)
    models, built = {}, {}
    for name in args.variants:
        start = time.perf_counter()
        try:
            prefixes, base = split_variant(name)
            reusable = args.device.startswith("cuda") and prefixes[:1] != ["compiled_"] and base not in (
                "quanto_w8a8", "quanto_w4a8")  # GPU memory holds every variant; shapes matter to these only
            if not reusable:
                models[name] = build_variant(fp32, name, call)
            else:
                graph = prefixes[:1] == ["graph_"]  # a new capture per input shape, of the shared model
                key = (id(fp32), name[len("graph_"):] if graph else name)
                if key not in BUILT:
                    BUILT[key] = build_variant(fp32, key[1], call)
                models[name] = CudaGraphed(BUILT[key]) if graph else BUILT[key]
            fn = variant_forward(models[name], call, name)
            if name.startswith(("compiled_", "graph_")):
                fn()  # compiling (capturing) happens on the first call
        except Exception as err:  # a peer that cannot run here is reported, not fatal to the other rows
            if name == "fp32":
                raise
            models.pop(name, None)
            SKIPPED.append(f"{label} latent {latent} {name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            log(f"skipped {SKIPPED[-1]}")
            continue
        built[name] = time.perf_counter() - start
        log(f"{label} latent {latent}: built {name} in {built[name]:.1f} s")
        release_memory(reset_compiled=False)  # the float copies a build made and dropped
    fns = {name: variant_forward(model, call, name) for name, model in models.items()}
    outputs = {name: fn() for name, fn in fns.items()}
    for name, model in models.items():  # an "auto" model's layers have timed their paths on this size by now
        if split_variant(name)[1] == "auto_w4a4" and args.device.startswith("cuda"):
            counts = gpuauto.chosen_paths(model)
            CHOICES.append(f"{label} latent {latent} batch {batch} {name}: "
                           + ", ".join(f"{n} {path}" for path, n in counts.items()) + " (cumulative over sizes)")
            log(CHOICES[-1])
    reference = outputs["fp32"]  # parse_args always includes fp32
    errors = {name: ((out - reference).norm() / reference.norm()).item() for name, out in outputs.items()}
    half = outputs.get("bf16")
    errors_bf16 = {name: None if half is None else ((out - half).norm() / half.norm()).item()
                   for name, out in outputs.items()}
    del outputs
    peaks = {name: (cuda_step_peak_mib if args.device.startswith("cuda") else step_peak_mib)(fn)
             for name, fn in fns.items()}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    load_before = loadavg()
    samples = interleaved(fns, args.rounds, args.warmup, clock)
    load_after = loadavg()
    if args.profile:
        for name in args.profile:
            if name in fns:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    fns[name]()
                PROFILES.append(f"## {label}, latent {latent}, {name}: one step, top ops by self CPU time\n\n```\n"
                                + prof.key_averages().table(sort_by="self_cpu_time_total",
                                                            row_limit=args.profile_rows) + "\n```\n")
                log(PROFILES[-1])
    base = statistics.median(samples["fp32"])
    rows = []
    for name in fns:
        median = statistics.median(samples[name])
        rows.append({"model": label, "latent": latent, "batch": batch, "variant": name,
                     "median_ms": 1e3 * median, "min_ms": 1e3 * min(samples[name]),
                     "max_ms": 1e3 * max(samples[name]), "vs_fp32": base / median,
                     "resident_mib": resident_mib(models[name]), "saved_mib": saved_mib(models[name]),
                     "step_peak_mib": peaks[name],
                     "rel_l2_vs_fp32": errors[name],
                     "rel_l2_vs_bf16": errors_bf16[name], "build_s": built[name],
                     "load": f"{load_before} / {load_after}"})
    return rows


LEGEND = """Variants: `fake_*` dequantize the packed weight and run float ops on fake-quantized inputs (the reference);
`int_*` run every layer with quantized inputs on the integer kernels (`execution="integer"`: int8 GEMMs through
`torch._int_mm` on the CPU, the Triton kernels of `quant/gpukernels.py` on a CUDA GPU); `auto_w4a4` is the loading
default (on the CPU integer kernels only for layers wide enough to gain; on a GPU, per layer and input shape, the
fastest of the paths that serve the layer, timed on the first step of each size), `dense_w4a4` the same with every
layer on the dense path (the input fake-quantized and the weight dequantized per call by Triton kernels, then the
dense conv/linear of PyTorch in the model's dtype; GPU only), `scaled_w4a4` with every layer the float8 path serves
on it (bfloat16 linear layers and 1x1 convolutions: one `torch._scaled_mm` on float8 carriers, Hopper and later) and
the others on the integer kernels (`_fp8`: the weights resident as float8 carriers). Prefixes: `bf16_` is
the model in bfloat16 as a `torch_dtype=torch.bfloat16` load gives it (quantizer state in float32, everything else
bfloat16; a peer built on the bfloat16 model), `cl_` the model and its sample input in the channels-last memory
format (diffusers' `unet.to(memory_format=torch.channels_last)`), `fused_` diffusers' `fuse_qkv_projections()`,
`graph_` one step captured as a CUDA graph and replayed (no launch overhead), `compiled_` `torch.compile` (compile
time in "build s"; `compiled_w4a4` is `compiled_auto_w4a4`). Peers:
`torchao_w8a8` (`Int8DynamicActivationInt8WeightConfig`, Linear layers only), `quanto_w8a8`/`quanto_w4a8`
(optimum-quanto, Linear and Conv2d, activation ranges calibrated on the timed input), `bnb_nf4` (bitsandbytes NF4
weights, Linear only, computing in the model's dtype). Quantized weights are round-to-nearest: speed does not depend
on how rounding was learned. "rel. L2 vs bf16" compares with the `bf16` variant when it is in the run."""


def table(rows: list[dict]) -> str:
    lines = ["| model | latent | batch | variant | ms / step (median) | min | max | FP32 / variant | weights resident "
             "MiB | state dict as saved MiB | step peak MiB | rel. L2 vs FP32 | rel. L2 vs bf16 | build s | "
             "load avg before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['vs_fp32']:.2f}x"
        peak = "n/a" if r["step_peak_mib"] is None else f"{r['step_peak_mib']:.1f}"
        vs_bf16 = "n/a" if r["rel_l2_vs_bf16"] is None else f"{r['rel_l2_vs_bf16']:.2e}"
        saved = "n/a" if r.get("saved_mib") is None else f"{r['saved_mib']:.1f}"
        lines.append(f"| {r['model']} | {r['latent']} | {r['batch']} | {r['variant']} | {r['median_ms']:.1f} | "
                     f"{r['min_ms']:.1f} | {r['max_ms']:.1f} | {ratio} | {r['resident_mib']:.1f} | {saved} | {peak} | "
                     f"{r['rel_l2_vs_fp32']:.2e} | {vs_bf16} | {r['build_s']:.1f} | {r['load']} |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["embedded", "sd"], default=["embedded", "sd"])
    parser.add_argument("--latents", type=int, nargs="+", default=[32], help="latent sizes of the SD-sized UNet")
    parser.add_argument("--batch", type=int, nargs="+", default=[1],
                        help="samples per step (2 for classifier-free guidance); several give a row set each")
    parser.add_argument("--variants", nargs="+", type=variant_name, default=None,
                        help=f"default: {' '.join(DEFAULT_VARIANTS)} (--device cuda: {' '.join(GPU_VARIANTS)}); "
                             f"peers: {' '.join(PEER_VARIANTS)}; base variants take the prefixes "
                             f"{', '.join(PREFIXES)}, e.g. compiled_fp32, graph_bf16_int_w4a4, bf16_torchao_w8a8")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (the integer kernels are Triton "
                        "kernels there; memory is CUDA memory)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall clock, or the process's CPU time (stable on a busy machine at 1 thread)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sd-channels", type=int, nargs=4, default=list(SD_CHANNELS),
                        help="block channels of the SD-sized UNet (smaller for a smoke test)")
    parser.add_argument("--cross-attention-dim", type=int, default=768)
    parser.add_argument("--profile", nargs="*", default=[], metavar="VARIANT",
                        help="print the top ops of one step of these variants (stderr)")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--profile-output", type=Path, default=None,
                        help="write the --profile tables here (markdown, with the command)")
    parser.add_argument("--json", action="store_true",
                        help="time the SD-sized UNet at the first --latents (default 32) and print one JSON object")
    parser.add_argument("--igemm-config", default=None, metavar="BM,BN,BK,WARPS,STAGES",
                        help="tile configuration of the GPU implicit GEMM for every layer (tuning; default: its table)")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if args.igemm_config is not None:
        gpukernels.CONFIG_OVERRIDE = tuple(int(v) for v in args.igemm_config.split(","))
    if args.variants is None:
        args.variants = list(GPU_VARIANTS if args.device.startswith("cuda") else DEFAULT_VARIANTS)
    for required in ("fp32", "int_w8a8", "int_w4a4") if args.json else ("fp32",):
        if required not in args.variants:
            args.variants.insert(0 if required == "fp32" else len(args.variants), required)
    return args


def machine_info(args: argparse.Namespace) -> dict:
    processor = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_name()
    return {"device": args.device, "processor": processor, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "clock": args.clock, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def machine_line(machine: dict, args: argparse.Namespace) -> str:
    processor = machine["processor"]
    if args.device.startswith("cuda"):
        return f"{processor} (CUDA; step peak = CUDA memory allocated)"
    return (f"{processor}, {machine['cpu_count']} CPUs ({machine['cpu_capability']}), {machine['torch_threads']} torch "
            f"threads (step peak = resident memory), {report.malloc_line()}")


def write_report(rows: list[dict], args: argparse.Namespace, command: str, started: float, final: bool) -> None:
    """The markdown report of the rows so far: printed at the end, and written to ``--output`` after every size (a
    sweep stopped part way keeps what it measured)."""
    machine = machine_info(args)
    where = machine_line(machine, args)
    text = "\n".join([
        f"# Time per denoising step on {'the GPU' if args.device.startswith('cuda') else 'the CPU'}: FP32, "
        "quantized variants and peers", "",
        f"Command: `{command}`", "",
        f"{machine['date']}; {where}, torch {machine['torch']}, {args.clock} clock, median of {args.rounds} "
        f"interleaved rounds; {time.perf_counter() - started:.0f} s in all{'' if final else ' (so far)'}.", "",
        LEGEND, "", table(rows), "", *(["Not run: " + "; ".join(SKIPPED), ""] if SKIPPED else []),
        *(["Paths `auto` chose (layer and input shape choices): " + "; ".join(CHOICES), ""] if CHOICES else [])])
    if final:
        print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = "python benchmarks/inference_speed.py " + shlex.join(argv)
    dlogging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    if args.json:
        rows += measure("sd", sd_unet(args.sd_channels, args.cross_attention_dim), args.latents[0], args,
                        args.batch[0])
    else:
        if "embedded" in args.models:
            unet = load_embedded_unet().eval()
            for batch in args.batch:
                rows += measure("embedded digits", unet, unet.config.sample_size, args, batch)
        if "sd" in args.models:
            unet = sd_unet(args.sd_channels, args.cross_attention_dim)
            for latent in args.latents:
                for batch in args.batch:
                    rows += measure("SD-1.5-sized (random)", unet, latent, args, batch)
                    write_report(rows, args, command, started, final=False)
                    release_memory()  # the variants of one size are gone before the next are built
    if not args.json:
        write_report(rows, args, command, started, final=True)
    else:
        machine = machine_info(args)
        result = {f"{r['variant']}_ms": round(r["median_ms"], 3) for r in rows}
        result.update(model="sd", sd_channels=list(args.sd_channels), latent=args.latents[0], batch=args.batch[0],
                      rounds=args.rounds, command=command, **machine,
                      ratios={r["variant"]: round(r["vs_fp32"], 3) for r in rows})
        print(json.dumps(result))
        return
    if args.profile_output and PROFILES:
        args.profile_output.parent.mkdir(parents=True, exist_ok=True)
        machine = machine_info(args)
        args.profile_output.write_text("\n".join([
            f"# Where a step's time goes\n\nCommand: `{command}`\n\n{machine['date']}; {machine_line(machine, args)}, "
            f"torch {machine['torch']}\n", *PROFILES]))


if __name__ == "__main__":
    main()
