"""Gradient-conflict diagnostics: how much the timesteps disagree about where a unit's parameters should move.

For a unit, the calibration samples are cut into contiguous timestep groups; each group's mean reconstruction
error gives a gradient with respect to the AdaRound variables and, separately, the activation step sizes (the
step-size gradients agree across timesteps and would hide the conflict if concatenated). The matrix holds the
pairwise cosine distance ``1 - cos(G_t, G_k)``: 0 means aligned, 1 orthogonal, 2 opposite.
"""

from __future__ import annotations

from typing import Any

import torch

from .problem import UnitProblem, contiguous_groups


def cosine_distance_matrix(vectors: list[torch.Tensor]) -> list[list[float]]:
    v = torch.stack([x / (x.norm() + 1e-12) for x in vectors])
    return (1 - v @ v.T).tolist()


def gradient_conflict(problem: UnitProblem, num_groups: int, samples_per_group: int = 64,
                      seed: int = 0) -> dict[str, Any]:
    """Per-timestep-group gradients of the unit's error on its training samples and their pairwise cosine
    distances."""
    generator = torch.Generator().manual_seed(seed)
    train = problem.train_idx if len(problem.train_idx) else torch.arange(problem.num_samples)
    groups = contiguous_groups(problem.timesteps[train], num_groups)
    out: dict[str, Any] = {"group_timesteps": []}
    grads = {"rounding": [], "steps": []}
    for g in groups.unique():
        idx = train[torch.nonzero(groups == g).flatten()]
        idx = idx[torch.randperm(len(idx), generator=generator)[:samples_per_group]]
        t = problem.timesteps[idx]
        out["group_timesteps"].append([float(t.min()), float(t.max())])
        loss = problem.loss_sum(idx)  # this process's part of the group's summed error (None: it holds none)
        for kind, params in (("rounding", problem.rounding_params), ("steps", problem.step_params)):
            if not params:
                continue
            g_list = [None] * len(params)
            if loss is not None:
                g_list = torch.autograd.grad(loss / len(idx), list(params.values()), retain_graph=True,
                                             allow_unused=True)
            vector = torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1)
                                for p, x in zip(params.values(), g_list)])
            grads[kind].append(problem.shard.sum(vector))
    for kind, vectors in grads.items():
        if len(vectors) > 1:
            out[kind] = cosine_distance_matrix(vectors)
    return out


def mean_off_diagonal(matrix: list[list[float]]) -> float:
    m = torch.tensor(matrix)
    n = m.shape[0]
    return float((m.sum() - m.diagonal().sum()) / max(1, n * n - n))
