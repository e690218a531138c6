import copy

import pytest
import torch
from torch import nn

from diffusers_gac.quant.layers import FLOAT16, QuantConv2d, QuantLinear, round_to_float16_
from diffusers_gac.quant.quantizers import (
    ActQuantizer,
    SplitActQuantizer,
    TimestepContext,
    WeightQuantizer,
    affine_params,
    fake_quantize,
    mse_range_search,
    round_ste,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_error_is_at_most_half_a_step_inside_the_range(bits):
    x = torch.linspace(-3, 5, 1001)
    scale, zp = affine_params(x.min(), x.max(), bits)
    q = fake_quantize(x, scale, zp, bits)
    assert (q - x).abs().max() <= scale / 2 + 1e-6
    assert len(torch.unique(q)) <= 2**bits


def test_fake_quantize_clamps_outside_the_range():
    scale, zp = affine_params(torch.tensor(-1.0), torch.tensor(1.0), 4)
    q = fake_quantize(torch.tensor([-10.0, 10.0]), scale, zp, 4)
    assert q[0] == pytest.approx(-1.0, abs=scale.item())
    assert q[1] == pytest.approx(1.0, abs=scale.item())


def test_round_ste_passes_gradients_straight_through():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(round_ste(x.detach()), torch.tensor([0.0, 2.0, -2.0]))
    assert torch.equal(x.grad, torch.ones(3))


def test_fake_quantize_gives_scale_a_gradient():
    x = torch.randn(100)
    scale = torch.tensor(0.1, requires_grad=True)
    fake_quantize(x, scale, torch.tensor(8.0), 4).pow(2).sum().backward()
    assert scale.grad is not None and scale.grad != 0


def test_weight_quantizer_is_per_output_channel():
    w = torch.randn(6, 3, 3, 3) * torch.tensor([0.01, 0.1, 1, 10, 100, 1000]).view(6, 1, 1, 1)
    wq = WeightQuantizer(w.shape, bits=4, init="minmax")
    wq.init_range(w)
    assert wq.scale.shape == (6, 1, 1, 1)
    rel_err = ((wq(w) - w).abs().amax((1, 2, 3)) / w.abs().amax((1, 2, 3)))
    assert (rel_err < 0.1).all()  # every channel gets its own range, whatever its magnitude


def test_mse_init_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((16, 256))
    errs = {}
    for init in ("minmax", "mse"):
        q = WeightQuantizer(w.shape, bits=4, init=init)
        q.init_range(w)
        errs[init] = (q(w) - w).pow(2).mean().item()
    assert errs["mse"] < errs["minmax"]


def test_mse_range_search_never_worse_than_full_range():
    x = torch.randn(4, 300)
    s, z = mse_range_search(x, 3, dim=0)
    s0, z0 = affine_params(x.min(1).values, x.max(1).values, 3)
    err = (fake_quantize(x, s[:, None], z[:, None], 3) - x).abs().pow(2.4).mean(1)
    err0 = (fake_quantize(x, s0[:, None], z0[:, None], 3) - x).abs().pow(2.4).mean(1)
    assert (err <= err0 + 1e-7).all()


def test_adaround_starts_near_the_weight_and_hardens_to_its_learned_choice():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    q = WeightQuantizer(w.shape, bits=4, init="minmax")
    q.init_range(w)
    q.init_rounding(w)
    # h(alpha) starts at the fractional part: soft rounding reproduces the weight, except where the grid's ends clamp
    err = (q(w) - w).abs()
    assert (err <= q.scale / 2 + 1e-6).all()
    assert (err < 1e-3 * q.scale).float().mean() > 0.9
    with torch.no_grad():
        q.alpha.copy_(torch.randn_like(q.alpha) * 5)
    choice = (q.alpha >= 0).float()
    floor = torch.floor(w / q.scale)
    expected = (torch.clamp(floor + choice + q.zero_point, 0, 15) - q.zero_point) * q.scale
    codes = q.harden(w)
    assert torch.allclose((codes - q.zero_point) * q.scale, expected)
    assert q.alpha is None and q.rounding == "nearest"
    # hardened weights sit on the 4-bit grid of their channel
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 15


def test_rounding_regularizer_vanishes_for_decided_rounding():
    w = torch.randn(4, 4)
    q = WeightQuantizer(w.shape, bits=4)
    q.init_range(w)
    q.init_rounding(w)
    with torch.no_grad():
        q.alpha.fill_(50.0)
    assert q.rounding_regularizer(2.0).item() == pytest.approx(0.0)
    with torch.no_grad():
        q.alpha.fill_(-torch.log(torch.tensor((1.1 + 0.1) / (0.5 + 0.1) - 1)).item())  # h = 0.5
    assert q.rounding_regularizer(2.0).item() == pytest.approx(16.0, rel=1e-4)


def test_static_act_quantizer_learns_from_observed_data_and_gets_step_gradients():
    torch.manual_seed(0)
    q = ActQuantizer(4, "static")
    q.start_observing()
    x = torch.randn(32, 8, 4, 4) * 3
    assert torch.equal(q(x), x)  # observing does not change the data
    q.finish_observing()
    y = q(x)
    assert len(torch.unique(y)) <= 16
    assert (y - x).abs().mean() < 0.3 * x.abs().mean()
    q.scale.requires_grad_(True)
    q(x).sub(x).pow(2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0


def test_timestep_act_quantizer_uses_a_range_per_group():
    torch.manual_seed(0)
    ctx = TimestepContext(num_groups=2, num_train_timesteps=1000)
    q = ActQuantizer(4, "timestep", groups=2)
    q.context = ctx
    small, large = torch.randn(16, 4) * 0.1, torch.randn(16, 4) * 10
    ctx.set_timesteps(torch.tensor([100] * 16 + [900] * 16))
    q.start_observing()
    q(torch.cat([small, large]))
    q.finish_observing()
    assert q.scale[1] > 20 * q.scale[0]
    ctx.set_timesteps(100)  # a scalar timestep applies to the whole batch: group 0's fine grid
    small_error = (q(small) - small).abs()
    assert small_error.max() <= q.scale[0] and small_error.mean() <= q.scale[0] / 3  # rounding: about scale / 4
    ctx.set_timesteps(900)  # the same values on group 1's coarse grid mostly round to zero
    assert (q(small) - small).abs().mean() > 5 * small_error.mean()


def test_observed_ranges_do_not_depend_on_the_random_state():
    x = torch.randn(64, 8, 40)
    scales = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        q = ActQuantizer(4, "static")
        q.start_observing()
        q(x)
        q.finish_observing()
        scales.append(q.scale.clone())
    assert torch.equal(scales[0], scales[1])


def test_timestep_scheme_without_context_is_a_clear_error():
    q = ActQuantizer(4, "timestep", groups=3)
    with pytest.raises(RuntimeError, match="timestep"):
        q(torch.randn(2, 3))


def test_dynamic_act_quantizer_ranges_per_token():
    q = ActQuantizer(4, "dynamic", channel_dim=-1)
    x = torch.randn(2, 5, 32) * torch.tensor([1e-3, 1e-2, 1, 10, 100]).view(1, 5, 1)
    y = q(x)
    rel = (y - x).abs().amax(-1) / x.abs().amax(-1)
    assert (rel < 0.15).all()
    assert q.scale.numel() == 0  # nothing stored


def test_split_quantizer_gives_each_part_its_own_range():
    q = SplitActQuantizer(split=3, bits=4, scheme="static")
    x = torch.cat([torch.randn(8, 3, 4, 4) * 100, torch.randn(8, 5, 4, 4) * 0.01], 1)
    for part in (q.first, q.second):
        part.start_observing()
    q(x)
    for part in (q.first, q.second):
        part.finish_observing()
    y = q(x)
    assert q.second.scale < q.first.scale / 1000
    assert (y[:, 3:] - x[:, 3:]).abs().max() < 0.01  # a shared range would zero the small part out


@pytest.mark.parametrize("bad", [1, 9, 4.5, "4"])
def test_invalid_bits_are_rejected(bad):
    with pytest.raises(ValueError, match="w_bits"):
        WeightQuantizer((4, 4), bits=bad)
    with pytest.raises(ValueError, match="a_bits"):
        ActQuantizer(bad)


def test_invalid_scheme_is_rejected():
    with pytest.raises(ValueError, match="act_scheme"):
        ActQuantizer(4, "per-channel")


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(4, 6, 3, padding=1), lambda: nn.Linear(4, 6)])
def test_quant_layer_matches_float_layer_when_quantization_is_off(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(2, 4, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(2, 7, 4)
    cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
    q = cls.from_module(layer, w_bits=4, a_bits=4, act_scheme="dynamic")
    q.quantize_weight = False
    q.input_quantizer.enabled = False
    assert torch.allclose(q(x), layer(x))
    q.quantize_weight = True
    q.input_quantizer.enabled = True
    assert not torch.allclose(q(x), layer(x))
    assert q.weight_quantizer.scale.shape[0] == 6


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("make", [lambda: nn.Conv2d(6, 4, 3), lambda: nn.Conv2d(6, 6, 3, groups=3), lambda: nn.Linear(7, 5)])
def test_freeze_packs_integer_codes_and_keeps_the_output(bits, make):
    torch.manual_seed(0)
    layer = make()
    cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
    q = cls.from_module(layer, w_bits=bits, a_bits=None)
    q.weight_quantizer.init_rounding(q.weight)
    with torch.no_grad():
        q.weight_quantizer.alpha.copy_(torch.randn_like(q.weight_quantizer.alpha))
    q.weight_quantizer.rounding = "hard"
    x = torch.randn(2, 6, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(3, 7)
    expected = q(x).detach()
    q.freeze(float16=False)  # the codes alone (float16 rounding of the bias and scales: the tests below)
    assert q.frozen and "weight" not in dict(q.named_parameters())
    assert q.packed_weight.dtype == torch.uint8
    k = q.codes_per_channel
    assert q.packed_weight.shape == (q.weight_shape[0], (k + 1) // 2 if bits <= 4 else k)
    assert torch.allclose(q(x), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_quantized_in_float32(dtype):
    """A half-precision input gets the codes its values get in float32, returned in its dtype; an all-zero token
    stays zero (in float16 the smallest scale, 1e-8, would underflow to 0 and give 0/0)."""
    torch.manual_seed(0)
    q = ActQuantizer(4, "dynamic", channel_dim=-1)
    x = torch.randn(4, 16).to(dtype)
    x[1] = 0
    out = q(x)
    assert out.dtype == dtype and torch.isfinite(out).all() and (out[1] == 0).all()
    assert torch.equal(out, q(x.float()).to(dtype))

def _split_conv_with_ranges() -> QuantConv2d:
    torch.manual_seed(0)
    q = QuantConv2d.from_module(nn.Conv2d(6, 4, 3), w_bits=4, a_bits=4, act_scheme="static", split=2)
    q.input_quantizer.first.scale.fill_(0.1)
    q.input_quantizer.second.scale.fill_(0.3)
    return q


def test_freeze_rounds_the_bias_and_scales_to_float16_values_with_the_codes_of_the_calibrated_scale():
    q = _split_conv_with_ranges()
    plain = copy.deepcopy(q)
    plain.freeze(float16=False)
    q.freeze()
    assert torch.equal(q.packed_weight, plain.packed_weight)
    tensors = q.float16_tensors()
    assert set(tensors) == {"bias", "weight_quantizer.scale", "input_quantizer.first.scale",
                            "input_quantizer.second.scale"}
    for name, (t, _) in tensors.items():
        before = plain.float16_tensors()[name][0]
        assert t.dtype == torch.float32 and torch.equal(t, before.half().float()) and not torch.equal(t, before)


def test_a_frozen_layer_saves_its_bias_and_scales_as_float16_and_loads_them_exactly():
    q = _split_conv_with_ranges()
    q.freeze()
    state = q.state_dict()
    assert {k for k, t in state.items() if t.dtype == torch.float16} == set(q.float16_tensors())
    loaded = QuantConv2d.from_module(nn.Conv2d(6, 4, 3), w_bits=4, a_bits=4, act_scheme="static", split=2)
    loaded.make_frozen_placeholder()
    loaded.load_state_dict(state)
    for name, t in [*q.named_buffers(), *q.named_parameters()]:
        other = loaded.get_parameter(name) if name == "bias" else loaded.get_buffer(name)
        assert other.dtype == t.dtype and torch.equal(other, t), name
    x = torch.randn(2, 6, 5, 5)
    assert torch.equal(loaded(x), q(x))


def test_freeze_keeps_float32_values_float16_cannot_hold():
    """A scale below float16's normal range would lose relative precision and a bias above 65504 would overflow:
    those tensors keep their values and are saved as float32; the others are rounded as usual."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    with torch.no_grad():
        layer.weight.mul_(1e-5)  # weight scales near 1e-7
        layer.bias[0] = 1e5
    q = QuantLinear.from_module(layer, w_bits=4, a_bits=8, act_scheme="static")
    q.input_quantizer.scale.fill_(0.1)
    assert float(q.weight_quantizer.scale.max()) < FLOAT16.tiny
    plain = copy.deepcopy(q)
    plain.freeze(float16=False)
    q.freeze()
    assert torch.equal(q.weight_quantizer.scale, plain.weight_quantizer.scale) and torch.equal(q.bias, plain.bias)
    assert torch.equal(q.input_quantizer.scale, torch.tensor([0.1]).half().float())
    state = q.state_dict()
    assert state["bias"].dtype == state["weight_quantizer.scale"].dtype == torch.float32
    assert state["input_quantizer.scale"].dtype == torch.float16


@pytest.mark.parametrize("values, smallest, rounded", [
    ([0.1, -3.0], FLOAT16.tiny, True), ([0.0, 1e-6], 0.0, True), ([1e-6, 1.0], FLOAT16.tiny, False),
    ([7e4], 0.0, False), ([float("nan")], 0.0, False), ([float("inf")], 0.0, False)])
def test_round_to_float16_rounds_only_what_float16_holds(values, smallest, rounded):
    t = torch.tensor(values)
    before = t.clone()
    assert round_to_float16_(t, smallest) is rounded
    assert t.dtype == torch.float32
    assert torch.equal(t, before.half().float() if rounded else before) or not rounded and t.isnan().all()
