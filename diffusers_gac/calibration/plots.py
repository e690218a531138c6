"""Plots of what a calibration learned, from the unit reports (``CalibrationReport.to_dict()["units"]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pick_units(units: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Evenly spread units that have gradient-conflict diagnostics (down path, middle, up path)."""
    usable = [u for u in units if u.get("weighting", {}).get("conflict_before", {}).get("rounding")]
    if len(usable) <= count:
        return usable
    step = (len(usable) - 1) / (count - 1)
    return [usable[round(i * step)] for i in range(count)]


def plot_calibration(units: list[dict[str, Any]], path: str | Path, count: int = 4) -> Path:
    """One row per unit: timestep-gradient conflict before and after reconstruction, the weight mass per timestep
    (learned, or the fixed Fisher profile; uniform weights give a flat profile) with how far learned weights moved
    (effective sample fraction, max/min weight ratio, meta-steps that reached each logit), and the meta objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = pick_units(units, count)
    if not chosen:
        raise ValueError("no unit report carries diagnostics (reconstruction='none' records none)")
    fig, axes = plt.subplots(len(chosen), 4, figsize=(16, 3.4 * len(chosen)), squeeze=False)
    for row, unit in zip(axes, chosen):
        d = unit["weighting"]
        for ax, key, title in ((row[0], "conflict_before", "before"), (row[1], "conflict_after", "after")):
            im = ax.imshow(d[key]["rounding"], vmin=0, vmax=1.5, cmap="magma")
            labels = [f"{int(a)}-{int(b)}" for a, b in d[key]["group_timesteps"]]
            ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set_title(f"{unit['name']}\ncosine distance of timestep gradients, {title}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
        mass = d.get("weight_mass_per_timestep")
        fisher = d.get("fisher_per_timestep")
        if mass or fisher:
            profile = mass or {t: f / len(fisher) for t, f in fisher.items()}  # Fisher factors as weight mass
            ts = sorted(profile, key=float)
            row[2].bar(range(len(ts)), [profile[t] for t in ts])
            row[2].axhline(1 / len(ts), color="gray", ls="--", lw=1, label="uniform")
            row[2].set_xticks(range(len(ts))[:: max(1, len(ts) // 8)], ts[:: max(1, len(ts) // 8)], fontsize=7)
            title = "learned weight mass per timestep" if mass else "Fisher weight mass per timestep (fixed)"
            if "effective_sample_fraction" in d:
                updates = d.get("logit_updates", {})
                title += (f"\nESS {d['effective_sample_fraction']:.2f}, max/min {d['max_min_weight_ratio']:.2f}, "
                          f"updates per logit {updates.get('min', 0)}-{updates.get('max', 0)}")
            row[2].set_title(title, fontsize=8)
            row[2].set_xlabel("timestep", fontsize=7)
            row[2].legend(fontsize=7)
        else:
            row[2].text(0.5, 0.5, "uniform weights", ha="center", va="center")
        trace = d.get("meta_objective")
        if trace:
            row[3].plot(trace)
            row[3].set_title("meta objective per meta-step", fontsize=8)
            row[3].set_xlabel("meta-step", fontsize=7)
        else:
            row[3].text(0.5, 0.5, "no meta-steps", ha="center", va="center")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
