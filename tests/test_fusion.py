"""diffusers' ``fuse_qkv_projections()`` on quantized models (``quant/fusion.py``, ``QuantAttention``): the q/k/v
projections that quantize their shared input the same way run as one layer, with the unfused model's outputs."""

import copy
import re
import os

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0
from torch import nn

from diffusers_gac import GACConfig
from diffusers_gac.quant import attention, gpuexec
from diffusers_gac.quant.attention import QuantAttention, QuantAttnProcessor
from diffusers_gac.quant.checkpoint import quantized_tensor_specs
from diffusers_gac.quant.convert import convert_model, dequantize_model, freeze_model, set_execution
from diffusers_gac.quant.fusion import FusedQuantLinear, fusion_refusal
from tiny_models import example_call, tiny_unet2d_condition


def _quantized(execution="integer", seed=0, **options):
    model = tiny_unet2d_condition(cross_attention_dim=16)
    if seed:
        torch.manual_seed(seed)
        for p in model.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    options = {"w_bits": 4, "a_bits": 4, "weight_init": "minmax"} | options
    convert_model(model, GACConfig(**options))
    freeze_model(model, execution)
    return model


def _out(model, seed=0):
    with torch.no_grad():
        return model(**example_call(model, batch=2, seed=seed)).sample


def _attention(model):
    return [m for m in model.modules() if isinstance(m, QuantAttention)]


@pytest.mark.parametrize("attn_bits", [None, 8])
def test_fused_projections_give_the_unfused_outputs_bit_for_bit(attn_bits):
    model = _quantized(attn_bits=attn_bits)
    unfused, state = _out(model), model.state_dict()
    model.fuse_qkv_projections()
    modules = _attention(model)
    assert {m.is_cross_attention for m in modules} == {False, True}  # self- and cross-attention
    for m in modules:
        fused = m.to_kv if m.is_cross_attention else m.to_qkv
        assert isinstance(fused, FusedQuantLinear) and fused.execution == "integer"
        parts = (m.to_k, m.to_v) if m.is_cross_attention else (m.to_q, m.to_k, m.to_v)
        assert fused.part_features == tuple(p.out_features for p in parts)
        assert fused.input_quantizer is parts[0].input_quantizer  # the input is quantized once
        expected = QuantAttnProcessor if attn_bits else FusedAttnProcessor2_0
        assert type(m.processor) is expected and getattr(m.processor, "fused", True)
    assert torch.equal(_out(model), unfused)  # integer sums are exact; each output column is computed as before
    after = model.state_dict()  # derived: the checkpoint is the unfused model's
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    model.unfuse_qkv_projections()
    assert {type(p) for p in model.attn_processors.values()} == {QuantAttnProcessor if attn_bits else AttnProcessor2_0}
    assert torch.equal(_out(model), unfused)


def test_fused_reference_execution_matches_up_to_float_rounding():
    model = _quantized(execution="fake")
    unfused, specs = _out(model), quantized_tensor_specs(model)
    model.fuse_qkv_projections()
    torch.testing.assert_close(_out(model), unfused, rtol=1e-5, atol=1e-5)  # one float GEMM instead of three
    assert quantized_tensor_specs(model) == specs  # what a checkpoint of it must hold: the parts


def _perturb_smooth(attn):
    attn.to_k.smooth.mul_(1.5)


def _perturb_clip(attn):
    attn.to_k.input_quantizer.clip.fill_(0.9)


def _perturb_range(attn):
    attn.to_k.input_quantizer.scale.mul_(2)


@pytest.mark.parametrize("options, perturb, reason", [
    ({"smoothing": True}, _perturb_smooth, r"smooth differs"),
    ({"act_clipping": True}, _perturb_clip, r"input_quantizer.clip differs"),
    ({"act_scheme": "static"}, _perturb_range, r"input_quantizer.scale differs"),
    ({"lowrank_rank": 2}, None, r"low-rank branches"),
])
def test_projections_that_quantize_their_input_differently_stay_separate(options, perturb, reason):
    model = _quantized(**options)
    attn = next(m for m in _attention(model) if not m.is_cross_attention)
    if perturb is not None:
        with torch.no_grad():
            perturb(attn)
    assert fusion_refusal([attn.to_q, attn.to_k, attn.to_v]) is not None
    assert re.search(reason, fusion_refusal([attn.to_q, attn.to_k, attn.to_v]))
    unfused = _out(model)
    model.fuse_qkv_projections()
    assert not hasattr(attn, "to_qkv") and not attn.fused_projections
    assert not isinstance(attn.processor, FusedAttnProcessor2_0)  # kept: the fused one would need to_qkv
    assert torch.equal(_out(model), unfused)


def test_projections_kept_separate_are_reported_once_per_reason(monkeypatch):
    said = []
    monkeypatch.setattr(attention.logger, "warning", said.append)
    attention._warn_once.cache_clear()
    model = _quantized(lowrank_rank=2)
    model.fuse_qkv_projections()
    model.fuse_qkv_projections()  # every module, twice: one warning
    assert len(said) == 1 and "stay separate, as they have low-rank branches" in said[0]


def test_equal_static_ranges_fuse():
    """Fusion needs equal input quantization, not the dynamic scheme: static ranges that agree fuse too."""
    model = _quantized(act_scheme="static")  # never observed: every range is the initial one
    unfused = _out(model)
    model.fuse_qkv_projections()
    assert all(hasattr(m, "to_kv" if m.is_cross_attention else "to_qkv") for m in _attention(model))
    assert torch.equal(_out(model), unfused)


def test_refusal_names_what_is_wrong():
    linear = nn.Linear(8, 8)
    assert "not all quantized linear layers (Linear" in fusion_refusal([linear, linear])
    model = tiny_unet2d_condition(cross_attention_dim=16)
    convert_model(model, GACConfig(w_bits=4, a_bits=4, weight_init="minmax"))
    attn = _attention(model)[0]
    assert "not frozen" in fusion_refusal([attn.to_q, attn.to_k, attn.to_v])
    with pytest.raises(ValueError, match="cannot fuse these layers exactly: .*not frozen"):
        FusedQuantLinear.from_parts([attn.to_q, attn.to_k, attn.to_v])
    freeze_model(model)
    assert fusion_refusal([attn.to_q, attn.to_k, attn.to_v]) is None


def test_loading_a_state_dict_rebuilds_the_fused_projections():
    model, other = _quantized(), _quantized(seed=1)
    model.fuse_qkv_projections()
    assert not torch.equal(_out(model), _out(other))
    result = model.load_state_dict(other.state_dict())  # strict: the fused layers report nothing missing
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(_out(model), _out(other))


def test_a_copy_of_a_fused_model_is_fused_on_its_own_tensors():
    model = _quantized()
    model.fuse_qkv_projections()
    twin = copy.deepcopy(model)
    attn = next(m for m in _attention(twin) if not m.is_cross_attention)
    assert attn.to_qkv._parts[0] is attn.to_q and attn.to_qkv.input_quantizer is attn.to_q.input_quantizer
    assert torch.equal(_out(twin), _out(model))


def test_dequantize_after_fusion_gives_float_projections():
    model = _quantized(execution="fake")
    reference = _out(dequantize_model(copy.deepcopy(model)))
    model.fuse_qkv_projections()
    dequantize_model(model)
    attn = next(m for m in _attention(model) if not m.is_cross_attention)
    assert type(attn.to_qkv) is nn.Linear and type(attn.to_q) is nn.Linear
    torch.testing.assert_close(_out(model), reference, rtol=1e-5, atol=1e-5)


def test_float_projections_fuse_as_diffusers_fuses_them():
    model = tiny_unet2d_condition(cross_attention_dim=16)
    convert_model(model, GACConfig(w_bits=4, a_bits=4, weight_init="minmax", modules_to_not_convert=["down_blocks"]))
    freeze_model(model, "integer")
    unfused = _out(model)
    model.fuse_qkv_projections()
    kinds = {type(m.to_kv if m.is_cross_attention else m.to_qkv) for m in _attention(model)}
    assert kinds == {nn.Linear, FusedQuantLinear}
    torch.testing.assert_close(_out(model), unfused, rtol=1e-5, atol=1e-5)


def test_set_execution_reaches_the_fused_layers():
    model = _quantized()
    model.fuse_qkv_projections()
    chosen = set_execution(model, "fake")
    assert any(name.endswith("to_qkv") for name in chosen["fake"]) and not chosen["integer"]
    assert all(m.to_qkv.execution == "fake" for m in _attention(model) if not m.is_cross_attention)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or not gpuexec.triton_available(),
                    reason="runs the GPU kernels on CPU tensors through Triton's interpreter")
def test_gpu_paths_serve_the_fused_layer_column_for_column():
    model = _quantized()
    attn = next(m for m in _attention(model) if not m.is_cross_attention)
    parts = [attn.to_q, attn.to_k, attn.to_v]
    fused = FusedQuantLinear.from_parts(parts)
    x = torch.randn(2, 5, parts[0].in_features)
    with torch.no_grad():
        for path in ("integer", "dense"):
            separate = torch.cat([gpuexec.PATHS[path](*gpuexec.path_calls(p, x)[path]) for p in parts], dim=-1)
            out = gpuexec.PATHS[path](*gpuexec.path_calls(fused, x)[path])
            if path == "integer":  # exact integer sums: column for column what the parts give
                assert torch.equal(out, separate)
            else:  # the reference as a float GEMM: other tiles, other summation order
                torch.testing.assert_close(out, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("execution", ["fake", "integer"])
def test_a_fused_model_compiles(execution):
    """``torch.compile`` after fusing, as diffusers' guides order it: the reference in one graph (``fullgraph``), the
    integer kernels outside it (a break per layer, as unfused); both give the eager fused outputs."""
    model = _quantized(execution=execution)
    model.fuse_qkv_projections()
    eager = _out(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=execution == "fake")
    with torch.no_grad():
        out = compiled(**example_call(model, batch=2, seed=0)).sample
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
