import pytest
import torch
from tiny_models import example_call, tiny_unet2d
from torch import nn

from diffusers_gac.calibration.data import CalibrationData
from diffusers_gac.calibration.gac import (
    GradientAlignedWeighting,
    balanced_validation_split,
    importance_of,
    timestep_importance,
)
from diffusers_gac.calibration.problem import UnitProblem, contiguous_groups, per_sample_error
from diffusers_gac.calibration.reconstruction import reconstruct_model
from diffusers_gac.config import GACConfig
from diffusers_gac.quant.convert import convert_model, quantization_disabled
from diffusers_gac.quant.layers import QuantConv2d


def tiny_problem(seed=0, n=24):
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

    def loss(idx, params=None):
        out = layer(x[idx]) if params is None else torch.func.functional_call(layer, params, (x[idx],), strict=False)
        return per_sample_error(out, target[idx])

    alpha = layer.weight_quantizer.alpha
    return UnitProblem("conv", layer, {"weight_quantizer.alpha": alpha}, {}, timesteps, loss)


def strategy(**options):
    base = {"weighting": "gradient_aligned", "gac_groups": 4, "gac_val_fraction": 0.25, "gac_virtual_lr": 0.5,
                "gac_virtual_step": "sgd", "gac_gm_form": "dot"}
    s = GradientAlignedWeighting(GACConfig(**{**base, **options}))
    return s


@pytest.mark.parametrize("options", [{"gac_gm_weight": 0.0}, {"gac_gm_weight": 1.0},
                                     {"gac_gm_weight": 1.0, "gac_gm_form": "cosine", "gac_virtual_step": "normalized",
                                          "gac_virtual_lr": 0.05}])
def test_meta_gradient_matches_finite_differences(options):
    problem = tiny_problem()
    s = strategy(gac_meta_steps=0, **options)
    s.begin_unit(problem)
    train, val = s.train_idx[:12], s.val_idx
    logits = (0.3 * torch.randn(problem.num_samples, dtype=torch.float64)).requires_grad_(True)
    objective = s.meta_objective(logits, train, val)
    (grad,) = torch.autograd.grad(objective, logits)
    eps = 1e-5
    for j in train[:5].tolist():
        bump = torch.zeros_like(logits)
        bump[j] = eps
        plus = s.meta_objective(logits.detach() + bump, train, val).item()
        minus = s.meta_objective(logits.detach() - bump, train, val).item()
        assert grad[j].item() == pytest.approx((plus - minus) / (2 * eps), rel=1e-4, abs=1e-9)
    assert grad[val].abs().max() == 0  # validation samples carry no weight


def test_without_matching_and_with_one_group_it_is_learning_to_reweight():
    problem = tiny_problem()
    s = strategy(gac_meta_steps=0, gac_gm_weight=0.0, gac_groups=1)
    s.begin_unit(problem)
    train, val = s.train_idx[:10], s.val_idx
    logits = torch.randn(problem.num_samples, dtype=torch.float64, requires_grad=True)
    # learning-to-reweight written out: one SGD step on the weighted loss, then the plain validation error
    alpha = problem.rounding_params["weight_quantizer.alpha"]
    w = torch.softmax(logits[train], 0)
    (g,) = torch.autograd.grad((w * problem.per_sample_loss(train)).sum(), alpha, create_graph=True)
    l2r = problem.per_sample_loss(val, params={"weight_quantizer.alpha": alpha - 0.5 * g}).mean()
    gac = s.meta_objective(logits, train, val)
    assert gac.item() == pytest.approx(l2r.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(gac, logits)[0], torch.autograd.grad(l2r, logits)[0])


def test_learned_weights_are_a_distribution_over_training_samples():
    problem = tiny_problem()
    s = strategy(gac_meta_steps=5, gac_meta_lr=0.5, gac_max_logit=None)
    s.begin_unit(problem)
    w = s.learned_weights()
    assert torch.all(w >= 0) and w.sum().item() == pytest.approx(1.0)
    assert torch.all(w[s.val_mask] == 0)
    assert w[s.train_idx].std() > 0  # the meta-steps moved them
    batch = torch.arange(problem.num_samples)
    assert s.batch_weights(batch, 0).sum().item() == pytest.approx(1.0)
    diag = s.end_unit()
    assert len(diag["meta_objective"]) == 5
    assert sum(diag["weight_mass_per_timestep"].values()) == pytest.approx(1.0)


def test_bounded_logits_bound_the_weight_ratio():
    problem = tiny_problem()
    s = strategy(gac_meta_steps=10, gac_meta_lr=5.0, gac_max_logit=0.5)
    s.begin_unit(problem)
    w = s.learned_weights()[s.train_idx]
    assert (w.max() / w.min()).item() <= torch.exp(torch.tensor(1.0)).item() + 1e-6


def test_validation_split_is_timestep_balanced_and_groups_are_contiguous():
    t = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0]).repeat_interleave(20)
    mask = balanced_validation_split(t, 0.05, torch.Generator().manual_seed(0))
    assert [int(mask[t == v].sum()) for v in t.unique()] == [1] * 5
    groups = contiguous_groups(t, 2)
    assert groups[t == 10].unique().tolist() == [0] and groups[t == 50].unique().tolist() == [1]
    assert (groups[:-1] <= groups[1:]).all()


def _data(model, n=24):
    calls = [example_call(model, batch=n // 3, seed=s) for s in range(3)]
    inputs = {k: torch.cat([c[k] for c in calls]) for k in calls[0]}
    step_index = torch.arange(n) % 3
    inputs["timestep"] = torch.tensor([900, 500, 100])[step_index]  # three sampler steps, as recorded data has
    return CalibrationData(inputs=inputs, step_index=step_index, static={})


def _calibrated_state(weighting, **options):
    model = tiny_unet2d()
    config = GACConfig(weighting=weighting, iters=6, batch_size=8, a_bits=8, **options)
    convert_model(model, config)
    reports = reconstruct_model(model, _data(tiny_unet2d()), config, show_progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}, reports


def test_uniform_weights_reproduce_the_uniform_baseline_exactly():
    uniform, _ = _calibrated_state("uniform")
    gac, _ = _calibrated_state("gradient_aligned", gac_meta_steps=0, gac_val_fraction=0.0)
    assert uniform.keys() == gac.keys()
    assert all(torch.equal(uniform[k], gac[k]) for k in uniform)


def test_a_seed_makes_gac_repeatable_and_it_differs_from_uniform():
    a, reports = _calibrated_state("gradient_aligned", gac_meta_steps=3, gac_meta_lr=0.5, gac_val_fraction=0.2)
    b, _ = _calibrated_state("gradient_aligned", gac_meta_steps=3, gac_meta_lr=0.5, gac_val_fraction=0.2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    uniform, _ = _calibrated_state("uniform")
    assert any(not torch.equal(a[k], uniform[k]) for k in a)
    d = reports[0].weighting
    assert {"meta_objective", "weight_mass_per_timestep", "conflict_before", "conflict_after"} <= set(d)


def test_diagnostics_plot_is_written(tmp_path):
    from dataclasses import asdict

    from PIL import Image

    from diffusers_gac.calibration.plots import plot_calibration

    _, reports = _calibrated_state("gradient_aligned", gac_meta_steps=2, gac_val_fraction=0.2)
    path = plot_calibration([asdict(r) for r in reports], tmp_path / "d.png", count=2)
    assert Image.open(path).size[0] > 500
    with pytest.raises(ValueError, match="diagnostics"):
        plot_calibration([], tmp_path / "none.png")


def test_validation_from_quantized_trajectories_uses_a_separate_set():
    from diffusers import DDIMScheduler

    from diffusers_gac import quantize_model

    model = tiny_unet2d()
    config = GACConfig(weighting="gradient_aligned", gac_validation="quantized_trajectories",
                       gac_validation_trajectories=2, gac_meta_steps=2, iters=3, batch_size=8,
                       calib_num_inference_steps=4, calib_num_timesteps=4, calib_samples_per_timestep=4)
    report = quantize_model(model, config, scheduler=DDIMScheduler(num_train_timesteps=1000), show_progress=False)
    assert "record_validation" in report.seconds
    d = report.units[0].weighting
    assert d["validation_samples"] == 2 * 4  # 2 trajectories x 4 steps, none taken from the calibration set
    assert len(d["meta_objective"]) == 2
    assert sum(d["weight_mass_per_timestep"].values()) == pytest.approx(1.0)


def _unit_in_model(unit_name="down_blocks.0.resnets.0", **options):
    """A unit of the tiny UNet (float64, weight-only 4 bits) as the reconstruction loop sees it, and its data."""
    from diffusers_gac.calibration.reconstruction import (
        UnitReconstruction,
        capture_unit_cache,
    )
    from diffusers_gac.calibration.units import find_units
    from diffusers_gac.quant.convert import set_quant_state

    model = tiny_unet2d().double()
    base = {"weighting": "gradient_aligned", "a_bits": None, "gac_groups": 3, "gac_val_fraction": 0.25, "gac_virtual_lr": 0.5,
                "gac_virtual_step": "sgd", "gac_gm_form": "dot", "gac_meta_steps": 0, "batch_size": 8}
    config = GACConfig(**{**base, **options})
    convert_model(model, config)
    model.double()
    data = _data(model)
    data.inputs["sample"] = data.inputs["sample"].double()
    set_quant_state(model, weights=False, acts=False)
    units = {u.name: u for u in find_units(model, data.batch(torch.arange(2)))}
    unit = units[unit_name]
    cache = capture_unit_cache(model, unit, data, 64, torch.device("cpu"), torch.float64)
    set_quant_state(unit.module, weights=True, acts=False)
    job = UnitReconstruction(model, unit, cache, data.timesteps, config, torch.device("cpu"), torch.float64,
                             torch.Generator().manual_seed(0))
    rounding, steps = job.trainable_params()
    problem = UnitProblem(unit.name, unit.module, rounding, steps, data.timesteps, job.per_sample_loss)
    return model, data, config, problem


@pytest.mark.parametrize("gm_weight", [0.0, 1.0])
def test_output_level_importance_weighted_meta_gradient_matches_finite_differences(gm_weight):
    model, data, config, problem = _unit_in_model(gac_validation_target="output", gac_weight_granularity="timestep",
                                                  gac_timestep_importance="perturbation", gac_gm_weight=gm_weight)
    s = GradientAlignedWeighting(config)
    s.importance = {900.0: 3.0, 500.0: 1.0, 100.0: 0.2}  # as measured by begin_model (which needs a scheduler)
    s.model, s.output_data = model, data
    with torch.no_grad(), quantization_disabled(model):
        s.output_target = model(**data.batch(torch.arange(len(data))), return_dict=False)[0]
    s.begin_unit(problem)
    assert s.logits.shape == (3,)  # one logit per sampler step
    train, val = s.train_idx[:10], s.val_idx
    logits = torch.tensor([0.2, -0.1, 0.3], dtype=torch.float64, requires_grad=True)
    objective = s.meta_objective(logits, train, val)
    (grad,) = torch.autograd.grad(objective, logits)
    eps = 1e-6
    for j in range(3):
        bump = torch.zeros_like(logits)
        bump[j] = eps
        plus = s.meta_objective(logits.detach() + bump, train, val).item()
        minus = s.meta_objective(logits.detach() - bump, train, val).item()
        assert grad[j].item() == pytest.approx((plus - minus) / (2 * eps), rel=1e-4, abs=1e-12)
    # the validation error is the denoiser's output error, weighted by the importance of each sample's step
    with torch.no_grad():
        out = model(**data.batch(val), return_dict=False)[0]
    expected = per_sample_error(out, s.output_target[val])
    assert torch.allclose(s.val_loss_fn(val), expected)
    factor = importance_of(s.importance, data.timesteps[val]) / importance_of(s.importance, data.timesteps).mean()
    assert torch.allclose(s.val_factor[val].double(), factor, rtol=1e-6)


def test_fixed_importance_prior_weights_steps_by_their_bounded_importance():
    _, data, config, problem = _unit_in_model(gac_timestep_importance="perturbation", gac_importance_prior=True,
                                              gac_val_fraction=0.0, gac_max_logit=1.0)
    s = GradientAlignedWeighting(config)
    s.importance = {900.0: 4.0, 500.0: 1.0, 100.0: 0.001}
    s.begin_unit(problem)
    assert len(s.val_idx) == 0 and s.trace == []  # no meta-learning: a fixed weighting
    w = s.learned_weights()
    mass = {t: w[data.timesteps == t].sum().item() for t in (900.0, 500.0, 100.0)}
    assert mass[900.0] / mass[500.0] == pytest.approx(4.0, rel=1e-5)  # inside the bound: proportional
    assert mass[100.0] / mass[900.0] == pytest.approx(torch.exp(torch.tensor(-2.0)).item(), rel=1e-5)  # clamped


def test_timestep_importance_matches_ddim_at_the_last_step():
    from diffusers import DDIMScheduler

    model = tiny_unet2d()
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    imp = timestep_importance(model, scheduler, 4, trajectories=6, scale=0.1, seed=3)
    scheduler.set_timesteps(4)
    assert list(imp) == [float(t) for t in scheduler.timesteps]
    assert all(v >= 0 for v in imp.values())
    # DDIM's last step returns its x_0 prediction (x - sqrt(1 - a) eps) / sqrt(a): linear in eps
    g = torch.Generator().manual_seed(3)
    torch.randn(6, 1, 8, 8, generator=g)
    z = torch.randn(6, 1, 8, 8, generator=g)
    a = scheduler.alphas_cumprod[int(scheduler.timesteps[-1])].double()
    expected = ((1 - a) / a * z.double().pow(2).mean()).item()
    assert imp[float(scheduler.timesteps[-1])] == pytest.approx(expected, rel=1e-3)


def test_importance_without_a_scheduler_and_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="needs the scheduler"):
        _calibrated_state("gradient_aligned", gac_timestep_importance="perturbation")
    with pytest.raises(ValueError, match="gac_validation_target"):
        GACConfig(gac_validation_target="block")
    with pytest.raises(ValueError, match="gac_weight_granularity"):
        GACConfig(gac_weight_granularity="batch")
    with pytest.raises(ValueError, match="needs gac_timestep_importance"):
        GACConfig(gac_importance_prior=True)
    with pytest.raises(ValueError, match="gac_importance_scale"):
        GACConfig(gac_importance_scale=0)


def test_output_level_gac_runs_in_the_reconstruction_loop():
    from diffusers import DDIMScheduler

    model = tiny_unet2d()
    config = GACConfig(weighting="gradient_aligned", gac_validation_target="output", gac_weight_granularity="timestep",
                       gac_timestep_importance="perturbation", gac_importance_trajectories=2, gac_meta_steps=2,
                       gac_val_fraction=0.2, iters=3, batch_size=8, a_bits=8, calib_num_inference_steps=4,
                       calib_num_timesteps=4)
    convert_model(model, config)
    reports = reconstruct_model(model, _data(tiny_unet2d()), config, scheduler=DDIMScheduler(num_train_timesteps=1000),
                                show_progress=False)
    d = reports[0].weighting
    # measured at the sampler steps nearest to the data's timesteps 900, 500, 100 only
    assert len(d["meta_objective"]) == 2 and sorted(d["timestep_importance"]) == [0.0, 500.0, 750.0]
    assert sum(d["weight_mass_per_timestep"].values()) == pytest.approx(1.0)
