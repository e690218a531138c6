"""Checks of user input shared by every layer: each raises a ``ValueError`` that names the input and what it allows.

They sit at the bottom of the package (beside ``config``) so that the config, the quantizers, the loading hooks and
the command line word their refusals alike.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch

MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; calibration offsets a seed by small constants


def check_bits(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        allowed = "an integer from 2 to 8" + (" or None (full precision)" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def is_number(value: Any) -> bool:
    """A real number (int or float), not a bool, not NaN and not infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(name: str, value: Any, kind: type = int) -> None:
    ok = is_number(value) and value > 0
    if kind is int:
        ok = ok and isinstance(value, int)
    if not ok:
        raise ValueError(f"{name} must be a positive {'integer' if kind is int else 'finite number'}, got {value!r}")


def check_number(name: str, value: Any, low: float, high: float | None = None, *, high_inclusive: bool = False,
                 what: str | None = None) -> None:
    """``value`` is a finite number with ``low <= value`` and ``value < high`` (``<=`` with ``high_inclusive``)."""
    ok = is_number(value) and value >= low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        if what is None:
            what = f"a finite number >= {low}" if high is None else (
                f"a number in [{low}, {high}{']' if high_inclusive else ')'}")
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_seed(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an integer from 0 to 2**63 - 1, got {value!r}")


def suggest(name: str, known: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for a near miss among ``known``, else an empty string."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def available_devices() -> list[str]:
    devices = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        backend = getattr(torch, kind, None)
        if kind == "mps":
            if torch.backends.mps.is_available():
                devices.append("mps")
        elif backend is not None and backend.is_available():
            devices += [f"{kind}:{i}" for i in range(backend.device_count())]
    return devices


def check_device(value: Any, name: str = "device") -> torch.device:
    """The ``torch.device`` that ``value`` names, if this machine has it; otherwise a ValueError that lists those
    it has."""
    if isinstance(value, int) and not isinstance(value, bool):  # an accelerator index, as in device_map=0
        accelerators = [d.split(":")[0] for d in available_devices() if d != "cpu"]
        if not accelerators or value < 0:
            raise ValueError(f"{name} {value!r} (accelerator {value}) does not exist on this machine; it has: "
                             f"{', '.join(available_devices())}")
        value = torch.device(accelerators[0], value)
    try:
        device = value if isinstance(value, torch.device) else torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must name a torch device such as 'cpu', 'cuda', 'cuda:1' or 'mps', got "
                         f"{value!r}") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        present, count = torch.backends.mps.is_available(), 1
    elif backend is not None and hasattr(backend, "is_available") and hasattr(backend, "device_count"):
        present = backend.is_available()
        count = backend.device_count() if present else 0
    else:
        raise ValueError(f"{name} {str(device)!r} is not a device diffusers-gac can run on; this machine has: "
                         f"{', '.join(available_devices())}")
    if not present or (device.index is not None and device.index >= count):
        raise ValueError(f"{name} {str(device)!r} does not exist on this machine; it has: "
                         f"{', '.join(available_devices())}")
    return device
