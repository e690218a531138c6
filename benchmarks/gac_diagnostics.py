"""Diagnostics of one gradient-aligned calibration of the embedded model, for docs/results/gac.md.

    python benchmarks/gac_diagnostics.py --output docs/results/gac_diagnostics
    python benchmarks/gac_diagnostics.py --output docs/results/gac_paper_diagnostics --set weighting=gradient_aligned \
        gac_weight_granularity=sample gac_meta_steps=20 gac_meta_every=0 gac_val_rounding=soft

writes ``<output>.png`` (gradient conflict before/after per unit, learned weight mass per timestep, meta
objective) and ``<output>.json`` (the same numbers for every unit, plus summaries).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from diffusers_gac import GACConfig, quantize_model
from diffusers_gac.calibration.diagnostics import mean_off_diagonal
from diffusers_gac.calibration.plots import plot_calibration
from diffusers_gac.zoo import load_embedded_scheduler, load_embedded_unet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True, help="path prefix of the .png and .json to write")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="further GACConfig options")
    a = p.parse_args()
    extra = {}
    for item in a.set:
        key, _, value = item.partition("=")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    config = GACConfig(w_bits=a.w_bits, a_bits=a.a_bits, weighting="gradient_aligned", seed=a.seed, **extra)
    unet = copy.deepcopy(load_embedded_unet())
    scheduler = load_embedded_scheduler()
    report = quantize_model(unet, config, scheduler=scheduler).to_dict()
    units = report["units"]
    a.output.parent.mkdir(parents=True, exist_ok=True)
    plot_calibration(units, a.output.with_suffix(".png"))
    summary = [
        {
            "unit": u["name"],
            "rounding_conflict_before": mean_off_diagonal(u["weighting"]["conflict_before"]["rounding"]),
            "rounding_conflict_after": mean_off_diagonal(u["weighting"]["conflict_after"]["rounding"]),
            "step_conflict_before": mean_off_diagonal(u["weighting"]["conflict_before"]["steps"])
            if "steps" in u["weighting"]["conflict_before"] else None,
            "effective_sample_fraction": u["weighting"].get("effective_sample_fraction"),
            "max_min_weight_ratio": u["weighting"].get("max_min_weight_ratio"),
            "logit_updates": u["weighting"].get("logit_updates"),
        }
        for u in units
        if "rounding" in u["weighting"].get("conflict_before", {})
    ]
    masses = [u["weighting"]["weight_mass_per_timestep"] for u in units if "weight_mass_per_timestep" in u["weighting"]]
    mean_mass = {t: sum(m[t] for m in masses) / len(masses) for t in masses[0]} if masses else {}
    a.output.with_suffix(".json").write_text(json.dumps({"config": report["config"], "summary": summary,
                                                          "mean_weight_mass_per_timestep": mean_mass,
                                                          "units": units}, indent=1, default=str) + "\n")
    print(json.dumps({"mean_weight_mass_per_timestep": mean_mass}))
    for row in summary:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
