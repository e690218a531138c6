"""Gradient-aligned weighting and the reconstruction loop it runs in: the meta-gradient is exact, the weights can
move and reach every logit, the validation pass sees the final rounding, and held-out samples never train."""

import dataclasses
import itertools
from dataclasses import asdict

import pytest
import torch
from tiny_models import example_call, tiny_dit, tiny_unet2d
from torch import nn

from diffusers_gac.calibration.data import CalibrationData
from diffusers_gac.calibration.gac import GradientAlignedWeighting, balanced_validation_split, covering_batch
from diffusers_gac.calibration.problem import UnitProblem, contiguous_groups, per_sample_error
from diffusers_gac.calibration.reconstruction import (
    UnitReconstruction,
    capture_unit_cache,
    reconstruct_model,
    unit_seed,
)
from diffusers_gac.calibration.units import find_units
from diffusers_gac.config import GACConfig
from diffusers_gac.quant.convert import convert_model, set_quant_state
from diffusers_gac.quant.layers import QuantConv2d


def tiny_problem(seed=0, n=24, val_fraction=0.25):
    """A single quantized conv (float64, weight-only) as a reconstruction unit with 4 timesteps."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    layer = QuantConv2d.from_module(conv, w_bits=3, a_bits=None)
    layer.weight_quantizer.init_rounding(layer.weight)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(n, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        target = conv(x) + 0.05 * torch.randn(n, 4, 5, 5, dtype=torch.float64)
    timesteps = torch.tensor([100.0, 300.0, 600.0, 900.0]).repeat_interleave(n // 4)
    held_out = balanced_validation_split(timesteps, val_fraction, torch.Generator().manual_seed(seed))

    def loss(idx, params=None):
        out = layer(x[idx]) if params is None else torch.func.functional_call(layer, params, (x[idx],), strict=False)
        return per_sample_error(out, target[idx])

    alpha = layer.weight_quantizer.alpha
    return UnitProblem("conv", layer, {"weight_quantizer.alpha": alpha}, {}, timesteps, loss,
                       train_idx=torch.nonzero(~held_out).flatten(), val_idx=torch.nonzero(held_out).flatten())


def strategy(**options):
    base = {"weighting": "gradient_aligned", "gac_groups": 4, "gac_val_fraction": 0.25, "gac_virtual_lr": 0.5,
            "gac_virtual_step": "sgd", "gac_gm_form": "dot", "gac_meta_steps": 0, "gac_val_rounding": "soft"}
    return GradientAlignedWeighting(GACConfig(**{**base, **options}))


def _finite_difference_check(s, logits, train, val, coords):
    objective, grad = s.meta_gradient(logits, train, val)
    eps = 1e-5
    # a zero meta-gradient would pass the comparison below trivially: it must stand far above the rounding noise of
    # the finite differences (float64 resolution of the objective, divided by the step)
    assert grad.abs().max() > 1e3 * 2.2e-16 * abs(objective) / eps
    for j in coords:
        bump = torch.zeros_like(logits)
        bump[j] = eps
        plus = s.meta_gradient(logits.detach() + bump, train, val)[0]
        minus = s.meta_gradient(logits.detach() - bump, train, val)[0]
        assert grad[j].item() == pytest.approx((plus - minus) / (2 * eps), rel=1e-4, abs=1e-10)
    return grad


@pytest.mark.parametrize("options", [
    {"gac_gm_weight": 0.0, "gac_weight_granularity": "sample"},
    {"gac_gm_weight": 1.0, "gac_weight_granularity": "sample"},
    {"gac_gm_weight": 1.0, "gac_gm_form": "cosine", "gac_virtual_step": "normalized", "gac_virtual_lr": 0.05},
    {"gac_gm_weight": 1.0, "gac_weight_granularity": "timestep"},
])
def test_meta_gradient_matches_finite_differences(options):
    problem = tiny_problem()
    s = strategy(**options)
    s.begin_unit(problem)
    train, val = problem.train_idx[:12], problem.val_idx
    size = problem.num_samples if s.config.gac_weight_granularity == "sample" else 4
    logits = (0.3 * torch.randn(size, dtype=torch.float64)).requires_grad_(True)
    coords = train[:5].tolist() if size == problem.num_samples else range(4)
    grad = _finite_difference_check(s, logits, train, val, coords)
    if size == problem.num_samples:
        assert grad[val].abs().max() == 0  # validation samples carry no weight


def learning_to_reweight(problem, logits, train, val, factor=None):
    """Learning-to-reweight written out: one SGD step (0.5) on the weighted loss, then the validation error (each
    sample's multiplied by ``factor``, when given), averaged."""
    alpha = problem.rounding_params["weight_quantizer.alpha"]
    w = torch.softmax(logits[train], 0)
    (g,) = torch.autograd.grad((w * problem.per_sample_loss(train)).sum(), alpha, create_graph=True)
    errors = problem.per_sample_loss(val, params={"weight_quantizer.alpha": alpha - 0.5 * g})
    return (errors if factor is None else factor * errors).mean()


def test_without_matching_and_with_one_group_it_is_learning_to_reweight():
    problem = tiny_problem()
    s = strategy(gac_gm_weight=0.0, gac_groups=1, gac_weight_granularity="sample")
    s.begin_unit(problem)
    train, val = problem.train_idx[:10], problem.val_idx
    logits = torch.randn(problem.num_samples, dtype=torch.float64, requires_grad=True)
    l2r = learning_to_reweight(problem, logits, train, val)
    value, grad = s.meta_gradient(logits, train, val)
    assert value == pytest.approx(l2r.item(), rel=1e-12)
    assert torch.allclose(grad, torch.autograd.grad(l2r, logits)[0], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("form", ["dot", "cosine"])
def test_gradient_matching_term_against_an_independent_computation(form):
    problem = tiny_problem()
    with_gm, without = strategy(gac_gm_form=form, gac_groups=4, gac_virtual_lr=1e-12), strategy(gac_gm_weight=0.0,
                                                                                                gac_virtual_lr=1e-12)
    with_gm.begin_unit(problem)
    without.begin_unit(problem)
    val, train = problem.val_idx, problem.train_idx[:8]
    logits = torch.zeros(4, dtype=torch.float64)
    term = with_gm.meta_gradient(logits, train, val)[0] - without.meta_gradient(logits, train, val)[0]
    alpha = problem.rounding_params["weight_quantizer.alpha"].detach().clone().requires_grad_(True)
    virtual = {"weight_quantizer.alpha": alpha}
    # by hand: one gradient per timestep (4 groups), the mean pairwise similarity, negated
    grads = []
    for t in problem.timesteps[val].unique():
        idx = val[problem.timesteps[val] == t]
        (g,) = torch.autograd.grad(problem.per_sample_loss(idx, params=virtual).mean(), alpha)
        grads.append(g.flatten())
    sims = [float(a @ b) / ((float(a.norm() * b.norm()) + 1e-12) if form == "cosine" else 1.0)
            for a, b in itertools.combinations(grads, 2)]
    assert len(grads) == 4 and term == pytest.approx(-sum(sims) / len(sims), rel=1e-6)


def test_learned_weights_are_a_distribution_over_training_samples():
    problem = tiny_problem()
    s = strategy(gac_meta_steps=5, gac_meta_lr=0.5, gac_max_logit=None, gac_weight_granularity="sample")
    s.begin_unit(problem)
    w = s.learned_weights()
    assert torch.all(w >= 0) and w.sum().item() == pytest.approx(1.0)
    assert torch.all(w[problem.val_idx] == 0)
    assert w[problem.train_idx].std() > 0  # the meta-steps moved them
    assert s.batch_weights(problem.train_idx, 0).sum().item() == pytest.approx(1.0)
    diag = s.end_unit()
    assert len(diag["meta_objective"]) == 5
    assert sum(diag["weight_mass_per_timestep"].values()) == pytest.approx(1.0)


def test_bounded_logits_bound_the_weight_ratio():
    problem = tiny_problem()
    s = strategy(gac_meta_steps=10, gac_meta_lr=5.0, gac_max_logit=0.5, gac_weight_granularity="sample")
    s.begin_unit(problem)
    w = s.learned_weights()[problem.train_idx]
    assert (w.max() / w.min()).item() <= torch.exp(torch.tensor(1.0)).item() + 1e-6
    assert s.end_unit()["max_min_weight_ratio"] == pytest.approx((w.max() / w.min()).item())


def test_every_logit_is_reached_by_every_meta_step_and_the_weights_move():
    """The old default (per-sample logits, 20 meta-steps of 32 random samples) left most logits untouched."""
    problem = tiny_problem(n=48)
    s = strategy(gac_meta_steps=6, gac_meta_lr=0.1, batch_size=4)  # per-timestep logits, the default
    s.begin_unit(problem)
    d = s.end_unit()
    assert d["logit_updates"] == {"min": 6, "mean": 6.0, "max": 6, "logits": 4}
    assert d["max_min_weight_ratio"] > 1.05 and d["effective_sample_fraction"] < 1.0
    per_sample = strategy(gac_meta_steps=6, gac_meta_lr=0.1, batch_size=4, gac_weight_granularity="sample")
    per_sample.begin_unit(problem)
    assert per_sample.end_unit()["logit_updates"]["min"] < 6  # per-sample logits: some are missed


def test_covering_batches_hold_every_step():
    steps = torch.arange(5).repeat_interleave(10)
    pool = torch.arange(50)[torch.arange(50) % 7 != 0]
    for seed in range(5):
        batch = covering_batch(pool, steps, 3, torch.Generator().manual_seed(seed))
        assert sorted(steps[batch].unique().tolist()) == [0, 1, 2, 3, 4] and len(batch) == 5
        assert torch.isin(batch, pool).all() and len(batch.unique()) == len(batch)
    assert len(covering_batch(pool, steps, 12, torch.Generator().manual_seed(0))) == 12


def test_validation_split_is_timestep_balanced_and_groups_are_contiguous():
    t = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0]).repeat_interleave(20)
    mask = balanced_validation_split(t, 0.05, torch.Generator().manual_seed(0))
    assert [int(mask[t == v].sum()) for v in t.unique()] == [1] * 5
    groups = contiguous_groups(t, 2)
    assert groups[t == 10].unique().tolist() == [0] and groups[t == 50].unique().tolist() == [1]
    assert (groups[:-1] <= groups[1:]).all()


# -- a unit of a real model ---------------------------------------------------------------------------------------


def _data(model, n=24):
    calls = [example_call(model, batch=n // 3, seed=s) for s in range(3)]
    inputs = {k: torch.cat([c[k] for c in calls]) for k in calls[0]}
    step_index = torch.arange(n) % 3
    inputs["timestep"] = torch.tensor([900, 500, 100])[step_index]  # three sampler steps, as recorded data has
    return CalibrationData(inputs=inputs, step_index=step_index, static={})


def _unit_in_model(unit_name="down_blocks.0.resnets.0", **options):
    """A unit of the tiny UNet (float64) as the reconstruction loop sees it, its data and strategy."""
    model = tiny_unet2d().double()
    base = {"weighting": "gradient_aligned", "a_bits": None, "gac_groups": 3, "gac_val_fraction": 0.25,
            "gac_virtual_lr": 0.5, "gac_virtual_step": "sgd", "gac_gm_form": "dot", "batch_size": 8,
            "gac_val_rounding": "soft"}
    config = GACConfig(**{**base, **options})
    convert_model(model, config)
    model.double()
    data = _data(model)
    data.inputs["sample"] = data.inputs["sample"].double()
    set_quant_state(model, weights=False, acts=False)
    unit = {u.name: u for u in find_units(model, data.batch(torch.arange(2)))}[unit_name]
    cache = capture_unit_cache(model, unit, data, 64, torch.device("cpu"), torch.float64)
    s = GradientAlignedWeighting(config)
    s.begin_model(model, data)
    held_out = s.validation_mask(data.timesteps, torch.Generator().manual_seed(0))
    train_idx, val_idx = torch.nonzero(~held_out).flatten(), torch.nonzero(held_out).flatten()
    set_quant_state(unit.module, weights=True, acts=False)
    job = UnitReconstruction(model, unit, cache, data.timesteps, config, torch.device("cpu"), torch.float64, seed=0)
    job.init_activation_ranges(train_idx)
    set_quant_state(unit.module, weights=True, acts=True)
    rounding, steps = job.trainable_params()
    problem = UnitProblem(unit.name, unit.module, rounding, steps, data.timesteps, job.per_sample_loss,
                          train_idx=train_idx, val_idx=val_idx, check_names=job.check_names, rounding=job.rounding)
    return model, data, s, problem, job


NORMALIZED = {"gac_virtual_step": "normalized", "gac_virtual_lr": 0.05}


@pytest.mark.parametrize("options", [
    {"gac_validation_target": "output", "gac_gm_weight": 0.0, **NORMALIZED},
    {"gac_validation_target": "output", "gac_gm_weight": 1.0, **NORMALIZED},
    {"a_bits": 8, "act_scheme": "static", "gac_gm_weight": 1.0},  # learned activation step sizes in theta
    {"a_bits": 8, "act_scheme": "static", "gac_gm_weight": 0.0, "gac_validation_target": "output", **NORMALIZED},
    {"a_bits": 8, "act_scheme": "timestep", "act_timestep_groups": 3, "gac_gm_weight": 1.0},  # one range per group
])
def test_meta_gradient_on_a_model_unit_matches_finite_differences(options, monkeypatch):
    if options.get("act_scheme") in ("static", "timestep"):
        # Activation rounding is a step function whose straight-through gradient is a surrogate, so finite
        # differences cannot check it; without the rounding (clamping kept) the surrogate is the true derivative, and
        # what is checked is that the step sizes enter the virtual update and the meta-gradient exactly.
        import diffusers_gac.quant.quantizers as quantizers

        monkeypatch.setattr(quantizers, "round_ste", lambda v: v)
    model, data, s, problem, _ = _unit_in_model(**options)
    if options.get("act_scheme") in ("static", "timestep"):
        steps = list(problem.step_params.values())
        grads = torch.autograd.grad(problem.per_sample_loss(problem.train_idx).mean(), steps)
        assert steps and any(g.abs().max() > 0 for g in grads)  # the virtual step moves activation step sizes too
    s.begin_unit(problem)
    train, val = problem.train_idx[:8], problem.val_idx
    logits = (0.3 * torch.randn(3, dtype=torch.float64)).requires_grad_(True)
    _finite_difference_check(s, logits, train, val, range(3))


@pytest.mark.parametrize("scheme", ["static", "timestep"])
def test_gradient_matching_sees_the_learned_activation_step_sizes(scheme):
    """With static ranges every timestep shares the step sizes (per-timestep-group ranges: the timesteps of a range
    group): their gradients are part of each timestep group's gradient G_t, beside the rounding variables'."""
    # three sampler steps in two range groups: two of the steps share their ranges
    options = {"a_bits": 8, "act_scheme": scheme, "act_timestep_groups": 2, "gac_virtual_lr": 1e-12}
    _, _, with_gm, problem, _ = _unit_in_model(**options, gac_gm_weight=1.0)
    without = GradientAlignedWeighting(dataclasses.replace(with_gm.config, gac_gm_weight=0.0))
    with_gm.begin_unit(problem)
    without.begin_model(with_gm.model, None)
    without.begin_unit(problem)
    val, train = problem.val_idx, problem.train_idx[:8]
    logits = torch.zeros(3, dtype=torch.float64)
    term = with_gm.meta_gradient(logits, train, val)[0] - without.meta_gradient(logits, train, val)[0]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in problem.params.items()}
    assert any(n.endswith(".scale") for n in params) and any(n.endswith(".alpha") for n in params)
    grads = []
    with problem.rounding("soft"):
        for t in problem.timesteps[val].unique():
            idx = val[problem.timesteps[val] == t]
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(
                problem.per_sample_loss(idx, params=params).mean(), list(params.values()), allow_unused=False)]))
    sims = [float(a @ b) for a, b in itertools.combinations(grads, 2)]
    assert term == pytest.approx(-sum(sims) / len(sims), rel=1e-6)
    # the step sizes' part is not negligible: without it the term would differ
    alpha_only = [g[: sum(p.numel() for n, p in params.items() if n.endswith(".alpha"))] for g in grads]
    sims_alpha = [float(a @ b) for a, b in itertools.combinations(alpha_only, 2)]
    assert abs(sum(sims_alpha) / len(sims_alpha) - sum(sims) / len(sims)) > 1e-3 * abs(sum(sims) / len(sims))


def test_output_level_validation_is_the_denoisers_output_error():
    model, data, s, problem, _ = _unit_in_model(gac_validation_target="output", gac_gm_weight=0.0,
                                                gac_virtual_lr=1e-12)
    s.begin_unit(problem)
    val = problem.val_idx
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    objective = s.meta_gradient(logits, problem.train_idx[:8], val)[0]
    set_quant_state(model, weights=False, acts=False)
    set_quant_state(problem.module, weights=True, acts=True)
    with torch.no_grad():
        out = model(**data.batch(val), return_dict=False)[0]
    assert objective == pytest.approx(per_sample_error(out, s.output_target[val]).mean().item(), rel=1e-6)


def test_the_validation_pass_sees_the_rounding_reconstruction_ends_with():
    """Right after AdaRound's initialisation the soft rounding reproduces the float weights; the hard rounding
    reproduces round-to-nearest, whose error is what reconstruction has to fight."""
    _, _, s_hard, problem, job = _unit_in_model(gac_gm_weight=0.0, gac_val_rounding="hard", gac_virtual_lr=1e-12)
    s_soft = GradientAlignedWeighting(GACConfig(**{**s_hard.config.options(), "gac_val_rounding": "soft"}))
    for s in (s_hard, s_soft):
        s.begin_model(job.model, None)
        s.begin_unit(problem)
    val = problem.val_idx
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    hard = s_hard.meta_gradient(logits, problem.train_idx[:8], val)[0]
    soft = s_soft.meta_gradient(logits, problem.train_idx[:8], val)[0]
    with torch.no_grad(), job.rounding("hard"):
        expected_hard = job.per_sample_loss(val).mean().item()
    assert hard == pytest.approx(expected_hard, rel=1e-6) and soft < 0.5 * hard


def test_a_misspelt_parameter_name_is_refused():
    _, _, _, problem, job = _unit_in_model()
    alpha_name = next(iter(problem.rounding_params))
    with pytest.raises(KeyError, match="no parameter or buffer named"):
        job.per_sample_loss(problem.val_idx, params={alpha_name.replace("alpha", "alfa"): problem.params[alpha_name]})


def _calibrated_state(weighting, model=None, data=None, **options):
    model = model or tiny_unet2d()
    config = GACConfig(weighting=weighting, iters=12, batch_size=8, a_bits=8, **options)
    convert_model(model, config)
    reports = reconstruct_model(model, data or _data(tiny_unet2d()), config, show_progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}, reports


def test_uniform_weights_reproduce_the_uniform_baseline_exactly():
    uniform, _ = _calibrated_state("uniform")
    gac, _ = _calibrated_state("gradient_aligned", gac_meta_every=0, gac_val_fraction=0.0)
    assert uniform.keys() == gac.keys()
    assert all(torch.equal(uniform[k], gac[k]) for k in uniform)


def test_a_seed_makes_gac_repeatable_and_it_differs_from_uniform():
    a, reports = _calibrated_state("gradient_aligned", gac_meta_every=2, gac_meta_lr=0.5, gac_val_fraction=0.2)
    b, _ = _calibrated_state("gradient_aligned", gac_meta_every=2, gac_meta_lr=0.5, gac_val_fraction=0.2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    uniform, _ = _calibrated_state("uniform")
    assert any(not torch.equal(a[k], uniform[k]) for k in a)
    d = reports[0].weighting
    assert {"meta_objective", "weight_mass_per_timestep", "logit_updates", "conflict_before", "conflict_after"} <= set(d)
    # meta-steps start once the warm-up (20% of 12 steps) is over: steps 3, 5, 7, 9, 11
    assert len(d["meta_objective"]) == 5 and d["logit_updates"]["min"] == 5
    assert reports[0].val_loss_before is not None and reports[0].val_loss_after is not None


class _RecordingGAC(GradientAlignedWeighting):
    """Remembers every mini-batch it weighs and the held-out samples of every unit."""

    def __init__(self, config):
        super().__init__(config)
        self.batches, self.held_out = [], []

    def validation_mask(self, timesteps, generator):
        mask = super().validation_mask(timesteps, generator)
        self.held_out.append(mask)
        return mask

    def batch_weights(self, indices, step):
        self.batches.append((len(self.held_out), indices.clone()))
        return super().batch_weights(indices, step)


def test_held_out_samples_never_train_nor_set_activation_ranges():
    model, data = tiny_unet2d(), _data(tiny_unet2d(), n=48)
    config = GACConfig(weighting="gradient_aligned", a_bits=8, act_scheme="static", iters=8, batch_size=8,
                       gac_val_fraction=0.2)
    strategy_ = _RecordingGAC(config)
    convert_model(model, config)
    set_quant_state(model, weights=False, acts=False)
    k = [u.name for u in find_units(model, data.batch(torch.arange(2)))].index("conv_in")
    held = balanced_validation_split(data.timesteps, 0.2, torch.Generator().manual_seed(unit_seed(0, k) + 1))
    data.inputs["sample"][torch.nonzero(held).flatten()[0]] *= 1000  # held out of conv_in, far outside the rest
    reports = reconstruct_model(model, data, config, weighting=strategy_, show_progress=False)
    assert torch.equal(strategy_.held_out[k], held)
    for unit, batch in strategy_.batches:  # full batches of training samples only
        assert len(batch) == 8 and not strategy_.held_out[unit - 1][batch].any()
    observed_range = model.conv_in.input_quantizer.scale.abs().item() * 255
    assert observed_range < data.inputs["sample"][~held].abs().max().item() * 3
    assert all(r.val_loss_before is not None for r in reports)


def test_reports_hold_no_validation_error_without_a_held_out_set():
    _, reports = _calibrated_state("uniform")
    assert all(r.val_loss_before is None and r.val_loss_after is None for r in reports)


def test_diagnostics_plot_is_written(tmp_path):
    from PIL import Image

    from diffusers_gac.calibration.plots import plot_calibration

    _, reports = _calibrated_state("gradient_aligned", gac_meta_every=3, gac_val_fraction=0.2)
    path = plot_calibration([asdict(r) for r in reports], tmp_path / "d.png", count=2)
    assert Image.open(path).size[0] > 500
    with pytest.raises(ValueError, match="diagnostics"):
        plot_calibration([], tmp_path / "none.png")


@pytest.mark.parametrize("weighting", ["gradient_aligned", "fisher"])
def test_weightings_run_on_a_class_conditional_transformer(weighting):
    dit = tiny_dit()
    state, reports = _calibrated_state(weighting, model=dit, data=_data(tiny_dit()), gac_meta_every=3,
                                       gac_val_fraction=0.2)
    assert reports and all(r.loss_after == r.loss_after for r in reports)
    key = "fisher_per_timestep" if weighting == "fisher" else "weight_mass_per_timestep"
    assert all(len(r.weighting[key]) == 3 for r in reports)


def test_fisher_weights_follow_the_output_sensitivity():
    """A unit whose output is scaled down before the network output matters less: its Fisher factor shrinks by the
    square of the scale at every step, so the per-step profile stays the same."""
    from diffusers_gac.calibration.fisher import FisherWeighting

    model, data, _, problem, _ = _unit_in_model("conv_out", weighting="fisher")
    s = FisherWeighting(GACConfig(weighting="fisher"), samples_per_step=8)
    s.begin_model(model, data)
    s.begin_unit(problem)
    profile = s.step_fisher.clone()
    assert profile.mean().item() == pytest.approx(1.0) and len(profile) == 3
    sample = s.sample_factor[problem.train_idx]
    assert torch.allclose(s.batch_weights(problem.train_idx, 0), sample / sample.sum())
    # conv_out is the last layer: J is the identity, so every sample's sensitivity is the number of output values
    raw = s.output_sensitivity(problem.module, problem.train_idx[:6], problem.train_idx[:6], seed=1)
    assert raw.mean().item() == pytest.approx(64.0, rel=0.5)


def test_validation_from_quantized_trajectories_uses_a_separate_set():
    from diffusers import DDIMScheduler

    from diffusers_gac import quantize_model

    model = tiny_unet2d()
    config = GACConfig(weighting="gradient_aligned", gac_validation="quantized_trajectories",
                       gac_validation_trajectories=2, gac_meta_steps=2, gac_meta_every=0, iters=3, batch_size=8,
                       calib_num_inference_steps=4, calib_num_timesteps=4, calib_samples_per_timestep=4)
    report = quantize_model(model, config, scheduler=DDIMScheduler(num_train_timesteps=1000), show_progress=False)
    assert "record_validation" in report.seconds
    d = report.units[0].weighting
    assert d["validation_samples"] == 2 * 4  # 2 trajectories x 4 steps, none taken from the calibration set
    assert len(d["meta_objective"]) == 2
    assert sum(d["weight_mass_per_timestep"].values()) == pytest.approx(1.0)


def test_the_paper_formulation_is_one_call_away():
    config = GACConfig.paper(w_bits=4, a_bits=8)
    assert (config.weighting, config.gac_weight_granularity, config.gac_meta_steps, config.gac_meta_every,
            config.gac_val_rounding) == ("gradient_aligned", "sample", 20, 0, "soft")
    assert config.a_bits == 8


def test_learned_weights_are_the_default_unless_there_is_no_loss_or_ranges_are_static():
    assert GACConfig(w_bits=4, a_bits=4).weighting == "gradient_aligned"
    assert GACConfig(reconstruction="none").weighting == "uniform"  # round-to-nearest: nothing to weight
    saved = GACConfig(reconstruction="none").to_dict()
    assert GACConfig.from_dict(saved).weighting == "uniform"
    with pytest.raises(ValueError, match="reconstruction='none'"):
        GACConfig(reconstruction="none", weighting="gradient_aligned")
    # static ranges: learned weights lose sample quality there (docs/results/gac.md), so uniform unless asked for
    static = GACConfig(w_bits=4, a_bits=8, act_scheme="static")
    assert static.weighting == "uniform"
    assert GACConfig.from_dict(static.to_dict()).weighting == "uniform"
    assert GACConfig(act_scheme="static", weighting="gradient_aligned").weighting == "gradient_aligned"
    assert GACConfig(act_scheme="timestep").weighting == "gradient_aligned"
    assert GACConfig.paper(act_scheme="static").weighting == "gradient_aligned"
