"""``execution="auto"`` on a GPU: each quantized layer chooses, per input shape, between the paths that serve it
there (the integer kernels, ``gpuexec.gpu_run``; the dense path, ``gpuexec.dense_run``; and for bfloat16 linear
layers and 1x1 convolutions of at most 4 bits the float8 path, ``gpuexec.scaled_run``) by timing each once.

All compute the same layer (the dense path is the fake-quant reference itself; the integer kernels and the float8
GEMM sum the same codes, exactly in int32 and float32 arithmetic), so the choice is one of speed only, and it depends
on the layer, the input's shape, the GPU and whether the step is launch-bound: hence measured rather than ruled.
``pin_path`` fixes it (benchmarks, tests).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
from diffusers.utils import logging
from torch import nn

from ..checks import check_choice
from .intkernels import channels_last_input

logger = logging.get_logger(__name__)

PATHS = ("integer", "dense", "scaled")  # the keys of gpuexec.PATHS
_clock = time.perf_counter


def time_paths(runs: dict, device: torch.device, rounds: int = 3, calls: int = 3) -> dict[str, float]:
    """Seconds per call of each of ``runs`` (name: a function of no arguments): one call each first (compiles,
    caches), then ``rounds`` rounds of ``calls`` calls each, the paths taking turns, the least round counted; the
    device synchronized around each round, so a round's time includes the host's work (what bounds a small eager
    call) and the GPU's. A path whose first call raises is timed as infinite, with a warning (the others still
    run); if every path raises, the first one's error is raised."""
    failed = {}
    for name, run in runs.items():
        try:
            run()
        except Exception as err:  # noqa: BLE001  (a path that cannot run here loses the choice, and says why)
            failed[name] = err
    if len(failed) == len(runs):
        raise next(iter(failed.values()))
    for name, err in failed.items():
        logger.warning(f"execution='auto': the {name} path failed on this input ({type(err).__name__}: {err}); "
                       "the layer takes another")
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            if name in failed:
                continue
            _synchronize(device)
            start = _clock()
            for _ in range(calls):
                run()
            _synchronize(device)
            best[name] = min(best[name], (_clock() - start) / calls)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def _announce_timing() -> None:
    """Say once per process why a first call is slow."""
    logger.info("execution='auto' on a GPU: each quantized layer times the paths that serve it (integer kernels, "
                "dense, float8) on the first call of each input shape, so that call is slower; later calls take the "
                "fastest")


def path_key(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> tuple:
    """What a layer's choice depends on: the input's device, shape, dtype and layout, the layout asked of a
    convolution's output (channels-last ones read and write other strides), and the resident weight's dtype."""
    return x.device, weight.dtype, tuple(x.shape), x.dtype, channels_last_input(x), layer._channels_last


def chosen_path(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """The path ``layer`` is pinned to, or chose by timing for an input like ``x``; None if neither."""
    if layer._gpu_path is not None:
        return layer._gpu_path
    return layer.__dict__.get("_gpu_paths", {}).get(path_key(layer, x, weight))


def choose_path(layer: nn.Module, call: tuple[torch.Tensor, torch.Tensor], available: tuple[str, ...],
                runs: Callable[[], dict]) -> str:
    """The path an ``"auto"`` layer takes for a call: ``call`` is its input and resident weight, ``available`` the
    paths that serve it (``PATHS``' names, the integer kernels first), ``runs()`` gives the call on each of them (a
    function of no arguments each). The fastest path for this input's shape, dtype and layout (``path_key``) on this
    device and weight storage, timed on the first such call and remembered by the layer (so offloading hooks that move
    it back and forth do not time it again), unless ``pin_path`` pinned one (a layer the pinned path does not serve
    takes the first available). While a CUDA graph is being captured nothing can be timed: an input not seen before
    then takes the first available path (the integer kernels)."""
    if layer._gpu_path is not None:
        return layer._gpu_path if layer._gpu_path in available else available[0]
    x, weight = call
    key = path_key(layer, x, weight)
    paths = layer.__dict__.setdefault("_gpu_paths", {})
    path = paths.get(key)
    if path is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return available[0]
        _announce_timing()
        seconds = time_paths(runs(), x.device)
        path = paths[key] = min(seconds, key=seconds.get)
        logger.debug("auto: %s for input %s %s (%s)", path, tuple(x.shape), x.dtype,
                     ", ".join(f"{name} {1e6 * s:.0f} us" for name, s in seconds.items()))
    return path


def pin_path(model: nn.Module, path: str | None) -> int:
    """Run every ``"auto"`` layer of ``model`` on ``path`` (``PATHS``) on a GPU, untimed, where the path serves it
    (else the first path that does: see ``choose_path``); None: choose by timing again. For benchmarks and tests.
    Returns how many quantized layers it set."""
    if path is not None:
        check_choice("path", path, PATHS)
    layers = [m for m in model.modules() if hasattr(m, "_integer_auto")]
    for layer in layers:
        layer._gpu_path = path
    return len(layers)


def chosen_paths(model: nn.Module) -> dict[str, int]:
    """How many choices of each path ``model``'s ``"auto"`` layers have made on a GPU (one per layer and input shape
    and dtype seen), by path name."""
    counts = dict.fromkeys(PATHS, 0)
    for m in model.modules():
        for path in m.__dict__.get("_gpu_paths", {}).values():
            counts[path] += 1
    return counts
