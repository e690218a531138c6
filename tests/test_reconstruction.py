import copy

import pytest
import torch

from diffusers_gac import GACConfig, quantize_model
from diffusers_gac.calibration.problem import per_sample_error
from diffusers_gac.calibration.reconstruction import rounding_beta


def test_per_sample_error_sums_channels_and_averages_positions():
    out, target = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    target[1] *= 2
    assert per_sample_error(out, target).tolist() == [3.0, 12.0]
    assert per_sample_error(torch.zeros(2, 5, 3), torch.ones(2, 5, 3)).tolist() == [3.0, 3.0]


def test_rounding_regulariser_is_off_during_warmup_then_anneals():
    assert rounding_beta(10, 100, 0.2) is None
    assert rounding_beta(20, 100, 0.2) == pytest.approx(20.0)
    assert rounding_beta(99, 100, 0.2) == pytest.approx(2.0, abs=0.3)


@pytest.mark.slow
def test_reconstruction_lowers_block_error_below_round_to_nearest(digits_unet, digits_scheduler):
    model = copy.deepcopy(digits_unet)
    config = GACConfig(w_bits=4, a_bits=4, iters=60, calib_num_inference_steps=10, calib_num_timesteps=5,
                       calib_samples_per_timestep=16)
    report = quantize_model(model, config, scheduler=digits_scheduler, show_progress=False)
    resnets = [u for u in report.units if u.kind == "ResnetBlock2D"]
    assert all(u.loss_after < u.loss_before for u in resnets)
    assert sum(u.loss_after for u in report.units) < 0.95 * sum(u.loss_before for u in report.units)
