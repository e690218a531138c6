"""The public verbs and the atomic folder writes under saving."""

import pytest
import torch
from diffusers import DDIMScheduler
from tiny_models import example_call, tiny_unet2d

from diffusers_gac import GACConfig, GACQuantizer, quantize_model, record_calibration_data
from diffusers_gac.quant.convert import QUANT_LAYERS, quant_layers
from diffusers_gac.saving import replace_folder_atomically

FAST = dict(iters=4, calib_num_inference_steps=5, calib_num_timesteps=3, calib_samples_per_timestep=4, batch_size=8)


def _out(model, call):
    with torch.no_grad():
        return model(**call).sample


@pytest.fixture(scope="module")
def scheduler():
    return DDIMScheduler(num_train_timesteps=1000)


def test_quantize_model_converts_calibrates_and_marks_the_model(scheduler):
    model = tiny_unet2d()
    num_float = sum(type(m) in QUANT_LAYERS for m in model.modules())
    config = GACConfig(**FAST)
    report = quantize_model(model, config, scheduler=scheduler, show_progress=False)
    layers = quant_layers(model)
    assert len(layers) == num_float == len(report.layout.layers) and report.skipped_layers == []
    assert all(layer.frozen and not hasattr(layer, "weight") for layer in layers.values())
    assert report.num_calibration_samples == 3 * 4  # 3 kept steps x 4 trajectories
    assert sum(u.layers for u in report.units) == num_float  # every layer reconstructed in exactly one unit
    assert isinstance(model.hf_quantizer, GACQuantizer) and model.is_quantized
    assert model.config.quantization_config.layout == report.layout
    assert model.hf_quantizer.calibration_report["num_calibration_samples"] == 12
    assert config.layout is None  # the caller's config is not changed
    with pytest.raises(ValueError, match="quantized"):
        model.half()


def test_quantize_model_on_given_data_never_samples_and_is_deterministic(scheduler):
    fp = tiny_unet2d()
    config = GACConfig(**FAST)
    data = record_calibration_data(fp, config, scheduler=scheduler, show_progress=False)

    def refuse(num_trajectories, seed):
        raise AssertionError("sampled although calibration data was given")

    outs = []
    for _ in range(2):
        model = tiny_unet2d()
        quantize_model(model, config, calibration_data=data, sampler=refuse, show_progress=False)
        outs.append(_out(model, example_call(model)))
    assert torch.equal(outs[0], outs[1])


def test_more_bits_give_outputs_closer_to_full_precision(scheduler):
    fp = tiny_unet2d()
    call = example_call(fp)
    reference = _out(fp, call)
    errors = {}
    for w, a in ((8, 8), (4, 8), (4, 4), (2, 4)):
        model = tiny_unet2d()
        quantize_model(model, GACConfig(w_bits=w, a_bits=a, special_bits=None, **FAST), scheduler=scheduler,
                       show_progress=False)
        errors[(w, a)] = (_out(model, call) - reference).pow(2).mean().item() / reference.pow(2).mean().item()
    assert 0 < errors[(8, 8)] < 1e-3
    assert errors[(8, 8)] < errors[(4, 8)] < errors[(4, 4)] < errors[(2, 4)]


def test_quantize_model_needs_a_way_to_get_data():
    with pytest.raises(ValueError, match="needs a scheduler or a sampler"):
        quantize_model(tiny_unet2d(), GACConfig(**FAST), show_progress=False)


def test_interrupted_write_leaves_no_folder(tmp_path):
    out = tmp_path / "model"

    def write(folder):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. Ctrl-C halfway through saving

    with pytest.raises(KeyboardInterrupt):
        replace_folder_atomically(out, write)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_write_over_a_folder_keeps_the_old_one(tmp_path):
    out = tmp_path / "model"
    replace_folder_atomically(out, lambda folder: (folder / "a.txt").write_text("old"))

    def write(folder):
        (folder / "a.txt").write_text("new")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        replace_folder_atomically(out, write, keep_existing=True)
    assert (out / "a.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]
    replace_folder_atomically(out, lambda folder: (folder / "b.txt").write_text("b"), keep_existing=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]
    replace_folder_atomically(out, lambda folder: (folder / "c.txt").write_text("c"))
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]
