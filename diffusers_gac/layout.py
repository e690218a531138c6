"""``QuantizedLayout``: what calibration decided about a model's layout, written to config.json under ``"layout"``,
and the checks that it is well formed and agrees with the config's format options."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from .checks import check_bits

# the keys of one converted layer in QuantizedLayout.layers; "rank" (its low-rank branch) only where it has one
LAYER_KEYS = ("w_bits", "a_bits", "split")
OPTIONAL_LAYER_KEYS = ("rank",)


@dataclass
class QuantizedLayout:
    """What calibration decided about the model's layout; what a saved checkpoint needs to rebuild its layers.

    ``layers`` maps every converted Conv2d/Linear to ``{"w_bits", "a_bits", "split"}`` (``split``: channels of the
    first part of a concatenated skip input, or None), plus ``"rank"`` for a layer with a low-rank 16-bit branch
    (``GACConfig.lowrank_rank``); ``attention`` names the Attention modules whose matmuls are quantized.
    """

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    attention: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": copy.deepcopy(self.layers), "attention": list(self.attention)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantizedLayout:
        if not isinstance(d, dict) or not isinstance(d.get("layers"), dict):
            raise ValueError(f"layout must be a dict with a 'layers' mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {"layers", "attention"})
        if unknown:
            raise ValueError(f"layout has unknown keys {unknown}; it holds only 'layers' and 'attention'")
        layout = cls(layers=copy.deepcopy(d["layers"]), attention=list(d.get("attention") or []))
        layout.check()
        return layout

    def check(self) -> None:
        """Every entry well formed: ``{"w_bits": 2-8, "a_bits": 2-8 or None, "split": None or a positive
        integer}`` under a module name, attention modules named by strings."""
        for name, spec in self.layers.items():
            where = f"layout.layers[{name!r}]"
            if not isinstance(name, str) or not name:
                raise ValueError(f"layout.layers must be keyed by module names, got {name!r}")
            if (not isinstance(spec, dict) or not set(LAYER_KEYS) <= set(spec)
                    or not set(spec) <= set(LAYER_KEYS + OPTIONAL_LAYER_KEYS)):
                keys = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
                raise ValueError(f"{where} must be a dict with the keys {list(LAYER_KEYS)} (and optionally "
                                 f"{list(OPTIONAL_LAYER_KEYS)}), got {keys}")
            check_bits(f"{where}['w_bits']", spec["w_bits"])
            check_bits(f"{where}['a_bits']", spec["a_bits"], allow_none=True)
            split = spec["split"]
            if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split <= 0):
                raise ValueError(f"{where}['split'] must be None or a positive number of channels, got {split!r}")
            rank = spec.get("rank", 0)
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise ValueError(f"{where}['rank'] must be the positive rank of the layer's low-rank branch, got {rank!r}")
        if not all(isinstance(a, str) and a for a in self.attention):
            raise ValueError(f"layout.attention must be a list of Attention module names, got {self.attention!r}")

    def disagreements(self, config) -> list[str]:
        """How these layers contradict the config's format options (empty when they agree). A layer carries the
        config's bits, or the higher ``special_bits`` of the first/last layers and embeddings."""
        w = {config.w_bits} | ({max(config.w_bits, config.special_bits)} if config.special_bits else set())
        if config.a_bits is None:
            a = {None}
        else:
            a = {config.a_bits} | ({max(config.a_bits, config.special_bits)} if config.special_bits else set())
        problems = []
        for option, allowed, key in (("w_bits", w, "w_bits"), ("a_bits", a, "a_bits")):
            wrong = {n: s[key] for n, s in self.layers.items() if s[key] not in allowed}
            if wrong:
                name, bits = next(iter(wrong.items()))
                problems.append(
                    f"{option} is {getattr(config, option)!r} (special_bits {config.special_bits!r}) but {len(wrong)} "
                    f"layers have {key} outside {sorted(allowed, key=str)}, e.g. {name!r} with {bits!r}")
        if (config.attn_bits is None) != (not self.attention):
            problems.append(f"attn_bits is {config.attn_bits!r} but {len(self.attention)} attention modules are "
                            "listed as quantized")
        split = [n for n, s in self.layers.items() if s["split"] is not None]
        if split and not config.split_skip_inputs:
            problems.append(f"split_skip_inputs is False but {len(split)} layers have split inputs, e.g. {split[0]!r}")
        skipped = [n for n in self.layers if any(n == p or n.startswith(p + ".") for p in config.modules_to_not_convert
                                                 or [])]
        if skipped:
            problems.append(f"modules_to_not_convert keeps {skipped[0]!r} in full precision but the layout lists it")
        ranked = [n for n, s in self.layers.items() if s.get("rank")]
        if ranked and not config.lowrank_rank:
            problems.append(f"lowrank_rank is 0 but {len(ranked)} layers have a low-rank branch, e.g. {ranked[0]!r}")
        return problems
