"""Step influence (calibration/influence.py) and the influence-weighted validation error of learned weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from test_gac import learning_to_reweight, strategy, tiny_problem
from tiny_models import tiny_unet2d

from diffusers_gac import GACConfig, quantize_model
from diffusers_gac.calibration.influence import step_influence
from diffusers_gac.sampling import scheduler_sampler

SILENT_STEPS = 6


def silent_unet():
    """A UNet whose output is zero: DDIM then moves every sample by a fixed linear map per step."""
    model = tiny_unet2d()
    with torch.no_grad():
        model.conv_out.weight.zero_()
        model.conv_out.bias.zero_()
    return model


def test_the_influence_of_a_silent_denoiser_is_ddims_linear_map():
    """With a zero noise prediction, an error p at step k reaches the last step's input as
    c_k * sqrt(abar_last / abar_{k+1}) * p, c_k the DDIM coefficient of the prediction at step k."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    model = silent_unet()
    influence = step_influence(model, scheduler_sampler(model, scheduler, SILENT_STEPS, show_progress=False),
                               SILENT_STEPS, trajectories=64, seed=3)
    scheduler.set_timesteps(SILENT_STEPS)
    timesteps = [int(t) for t in scheduler.timesteps]
    assert list(influence) == [float(t) for t in timesteps]
    abar = scheduler.alphas_cumprod.double()
    for k in range(SILENT_STEPS - 1):
        t, prev = timesteps[k], timesteps[k + 1]
        c = (1 - abar[prev]).sqrt() - (abar[prev] * (1 - abar[t]) / abar[t]).sqrt()
        expected = (c * (abar[timesteps[-1]] / abar[prev]).sqrt()).pow(2).item()
        assert influence[float(t)] == pytest.approx(expected, rel=0.1)  # z: 64 x 64 standard normals
    assert influence[float(timesteps[-1])] == influence[float(timesteps[-2])]  # the last step takes its neighbour's


def test_step_influence_refuses_a_sampler_that_breaks_the_step_count():
    model = silent_unet()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    with pytest.raises(ValueError, match="not a whole number of trajectories of calib_num_inference_steps=5"):
        step_influence(model, scheduler_sampler(model, scheduler, 4, show_progress=False), 5, trajectories=2)


def _influence_strategy(influence, **options):
    s = strategy(gac_validation_weighting="sample_influence", **options)
    s.step_influence = influence
    return s


def test_influence_weighted_validation_is_learning_to_reweight_on_the_weighted_error():
    problem = tiny_problem()
    influence = {100.0: 0.0, 300.0: 0.5, 600.0: 1.0, 900.0: 4.0}
    s = _influence_strategy(influence, gac_gm_weight=0.0, gac_groups=1, gac_weight_granularity="sample")
    s.begin_unit(problem)
    train, val = problem.train_idx[:10], problem.val_idx
    logits = torch.randn(problem.num_samples, dtype=torch.float64, requires_grad=True)
    factor = torch.tensor([influence[float(t)] for t in problem.timesteps[val]], dtype=torch.float64)
    weighted = learning_to_reweight(problem, logits, train, val, factor / factor.mean())
    value, grad = s.meta_gradient(logits, train, val)
    assert value == pytest.approx(weighted.item(), rel=1e-12)
    assert torch.allclose(grad, torch.autograd.grad(weighted, logits)[0], rtol=1e-9, atol=1e-15)
    # the weighting changes what the logits learn: the unweighted objective's gradient differs
    plain = strategy(gac_gm_weight=0.0, gac_groups=1, gac_weight_granularity="sample")
    plain.begin_unit(problem)
    assert not torch.allclose(plain.meta_gradient(logits, train, val)[1], grad, rtol=1e-3)


def test_influence_weighted_meta_gradient_with_gradient_matching_matches_finite_differences():
    from test_gac import _finite_difference_check

    problem = tiny_problem()
    s = _influence_strategy({100.0: 0.1, 300.0: 0.5, 600.0: 1.0, 900.0: 3.0}, gac_gm_weight=1.0)
    s.begin_unit(problem)
    logits = (0.3 * torch.randn(4, dtype=torch.float64)).requires_grad_(True)
    _finite_difference_check(s, logits, problem.train_idx[:12], problem.val_idx, range(4))


def test_a_timestep_without_a_measured_influence_is_named():
    s = _influence_strategy({100.0: 1.0, 300.0: 1.0, 600.0: 1.0})
    with pytest.raises(ValueError, match="no step influence was measured at timestep 900"):
        s.begin_unit(tiny_problem())


FAST = dict(weighting="gradient_aligned", gac_validation_weighting="sample_influence", gac_validation_trajectories=2,
            gac_meta_steps=2, gac_meta_every=0, iters=3, batch_size=8, calib_num_inference_steps=4,
            calib_num_timesteps=4, calib_samples_per_timestep=4)


def test_calibration_measures_the_influence_and_weights_the_validation_error_by_it():
    from diffusers_gac.calibration.gac import GradientAlignedWeighting

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    runs = {}
    for weighting in ("uniform", "sample_influence"):
        config = GACConfig(**{**FAST, "gac_validation_weighting": weighting, "gac_gm_weight": 0.0})
        strategy_ = GradientAlignedWeighting(config)
        report = quantize_model(tiny_unet2d(), config, scheduler=scheduler, weighting=strategy_, show_progress=False)
        runs[weighting] = report, strategy_
    report, measured = runs["sample_influence"]
    assert "step_influence" in report.seconds and "step_influence" not in runs["uniform"][0].seconds
    assert sorted(measured.step_influence) == [0.0, 250.0, 500.0, 750.0]
    assert all(v > 0 for v in measured.step_influence.values())
    assert measured.val_factor is not None and runs["uniform"][1].val_factor is None
    # same seed, same first virtual step, no gradient matching: the validation errors differ by the weighting alone
    first = {k: r.units[0].weighting["meta_objective"][0] for k, (r, _) in runs.items()}
    assert first["uniform"] != pytest.approx(first["sample_influence"], rel=1e-3)


def test_influence_weighting_without_a_sampler_is_refused_clearly():
    from diffusers_gac import record_calibration_data

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    model = tiny_unet2d()
    data = record_calibration_data(model, GACConfig(**FAST), scheduler=scheduler)
    with pytest.raises(ValueError, match="gac_validation_weighting='sample_influence' needs a scheduler or a sampler"):
        quantize_model(model, GACConfig(**FAST), calibration_data=data, show_progress=False)


def test_an_unknown_validation_weighting_is_refused():
    with pytest.raises(ValueError, match="gac_validation_weighting"):
        GACConfig(gac_validation_weighting="influence")
