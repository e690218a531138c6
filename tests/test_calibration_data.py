import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tiny_models import tiny_unet2d, tiny_unet2d_condition

from diffusers_gac import record_calibration_data
from diffusers_gac.calibration.data import CalibrationData, CalibrationRecorder, select_steps
from diffusers_gac.config import GACConfig
from diffusers_gac.sampling import sample_images


def test_uniform_selection_is_evenly_spaced():
    keep = select_steps(25, "uniform", 5, 16)
    assert sorted(keep) == [0, 6, 12, 18, 24]
    assert set(keep.values()) == {16}


def test_all_selection_keeps_every_step():
    assert select_steps(10, "all", 3, 4) == {k: 4 for k in range(10)}


def test_normal_selection_centres_on_the_late_middle_and_is_seeded():
    keep = select_steps(100, "normal", 20, 64, seed=1)
    total = sum(keep.values())
    mean = sum(k * c for k, c in keep.items()) / total
    assert total == 20 * 64
    assert 50 < mean < 70
    assert keep == select_steps(100, "normal", 20, 64, seed=1)
    assert keep != select_steps(100, "normal", 20, 64, seed=2)


def test_unknown_selection_is_rejected():
    with pytest.raises(ValueError, match="calib_timestep_selection"):
        select_steps(10, "log", 3, 4)


def _scheduler():
    return DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=1000).config)


def test_recorder_keeps_the_selected_steps_and_is_independent_of_the_sampling_batch():
    unet = tiny_unet2d()
    keep = {0: 6, 3: 4, 4: 6}
    datas = []
    for batch_size in (6, 4):
        with CalibrationRecorder(unet, keep, num_inference_steps=5) as rec:
            sample_images(unet, _scheduler(), 6, num_inference_steps=5, batch_size=batch_size, seed=0,
                          show_progress=False)
        datas.append(rec.data)
    a, b = datas
    assert len(a) == 16 and sorted(a.step_index.bincount().tolist()) == [0, 0, 4, 6, 6]
    order_a, order_b = a.step_index.argsort(stable=True), b.step_index.argsort(stable=True)
    assert torch.allclose(a.inputs["sample"][order_a], b.inputs["sample"][order_b], atol=1e-5)
    assert torch.equal(a.inputs["class_labels"][order_a], b.inputs["class_labels"][order_b])
    assert set(a.inputs) >= {"sample", "timestep", "class_labels"}
    # the timesteps are the scheduler's, per sample
    assert a.timesteps[a.step_index == 0].unique().tolist() == [_scheduler_timesteps(5)[0]]


def _scheduler_timesteps(n):
    s = _scheduler()
    s.set_timesteps(n)
    return s.timesteps.tolist()


def test_recorder_keeps_both_halves_under_classifier_free_guidance():
    unet = tiny_unet2d_condition()
    sched = _scheduler()
    sched.set_timesteps(3)
    cond, uncond = torch.randn(2, 3, 12), torch.zeros(2, 3, 12)
    latents = torch.randn(2, 4, 8, 8)
    with CalibrationRecorder(unet, {0: 1, 2: 2}, num_inference_steps=3) as rec, torch.no_grad():
        for t in sched.timesteps:
            eps = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            e_u, e_c = eps.chunk(2)
            latents = sched.step(e_u + 3.0 * (e_c - e_u), t, latents).prev_sample
    data = rec.data
    assert len(data) == 2 * 1 + 2 * 2
    ehs = data.inputs["encoder_hidden_states"]
    assert (ehs.abs().sum((1, 2)) == 0).sum() == 3  # one unconditional row per kept conditional row


def test_calibration_data_batch_and_save_round_trip(tmp_path):
    data = CalibrationData(
        inputs={"sample": torch.randn(5, 1, 4, 4), "timestep": torch.arange(5), "added_cond_kwargs.text_embeds": torch.randn(5, 3)},
        step_index=torch.arange(5),
        static={"cross_attention_kwargs": {"scale": 1.0}},
    )
    call = data.batch([1, 3], dtype=torch.float64)
    assert call["sample"].dtype == torch.float64 and call["timestep"].tolist() == [1, 3]
    assert call["added_cond_kwargs"]["text_embeds"].shape == (2, 3)
    assert call["cross_attention_kwargs"] == {"scale": 1.0}
    data.save(tmp_path / "calib.safetensors")
    loaded = CalibrationData.load(tmp_path / "calib.safetensors")
    assert torch.equal(loaded.inputs["sample"], data.inputs["sample"])
    assert loaded.static == data.static


def test_record_calibration_data_follows_the_config():
    unet = tiny_unet2d()
    config = GACConfig(calib_num_inference_steps=6, calib_num_timesteps=3, calib_samples_per_timestep=5)
    data = record_calibration_data(unet, config, scheduler=_scheduler(), show_progress=False)
    assert len(data) == 15
    assert sorted(data.step_index.unique().tolist()) == [0, 2, 5]
    assert data.inputs["class_labels"].min() >= 0 and data.inputs["class_labels"].max() < 10
