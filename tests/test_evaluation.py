"""Seeded sampling and the metrics, mostly on the embedded digits model as shipped."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, UNet2DModel

from conftest import tiny_unet_config
from diffusers_gac import zoo
from diffusers_gac.zoo import load_digits_split
from diffusers_gac.evaluation import (
    EvalResult,
    class_accuracy,
    classifier_features,
    evaluate_denoiser,
    frechet_distance,
    image_grid,
    metric_floor,
    psnr,
    sample_images,
    summarize,
    torchmetrics_fid,
)
from diffusers_gac.evaluation.evaluate import score_samples

FAST = dict(num_inference_steps=4, show_progress=False)


# -- the embedded model ----------------------------------------------------------------------------------------


def test_embedded_model_loads_through_diffusers(digits_unet, digits_scheduler):
    assert isinstance(digits_unet, UNet2DModel)
    assert isinstance(digits_scheduler, DDIMScheduler)
    assert digits_unet.config.sample_size == 8 and digits_unet.config.num_class_embeds == 10


def test_load_model_by_name_and_by_folder(digits_unet):
    by_name, scheduler = zoo.load_model("digits")
    by_folder, _ = zoo.load_model(zoo.embedded_model_path())
    assert isinstance(scheduler, DDIMScheduler)
    for a, b in zip(by_name.parameters(), by_folder.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_model_plain_diffusers_folder_gets_default_scheduler(tmp_path, tiny_unet):
    tiny_unet.save_pretrained(tmp_path)
    unet, scheduler = zoo.load_model(tmp_path)
    assert isinstance(unet, UNet2DModel) and isinstance(scheduler, DDIMScheduler)
    assert scheduler.config.num_train_timesteps == zoo.load_embedded_scheduler().config.num_train_timesteps


@pytest.mark.parametrize("bad", ["no-such-model", "/no/such/folder"])
def test_resolve_model_path_names_the_bad_value(bad):
    with pytest.raises(FileNotFoundError, match="no.such") as err:
        zoo.resolve_model_path(bad)
    assert "digits" in str(err.value)  # lists the embedded names


def test_resolve_model_path_rejects_a_folder_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        zoo.resolve_model_path(tmp_path)


# -- sampling --------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_samples(digits_unet, digits_scheduler):
    a, labels_a = sample_images(digits_unet, digits_scheduler, 20, seed=3, **FAST)
    b, labels_b = sample_images(digits_unet, digits_scheduler, 20, seed=3, **FAST)
    assert torch.equal(a, b) and torch.equal(labels_a, labels_b)


def test_different_seed_gives_different_samples(digits_unet, digits_scheduler):
    a, _ = sample_images(digits_unet, digits_scheduler, 20, seed=0, **FAST)
    b, _ = sample_images(digits_unet, digits_scheduler, 20, seed=1, **FAST)
    assert (a - b).abs().mean() > 0.1


def test_batch_size_does_not_change_samples(digits_unet, digits_scheduler):
    a, _ = sample_images(digits_unet, digits_scheduler, 24, batch_size=24, **FAST)
    b, _ = sample_images(digits_unet, digits_scheduler, 24, batch_size=5, **FAST)
    # equal up to the summation order of batched kernels
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_a_prefix_of_the_samples_does_not_depend_on_num_samples(digits_unet, digits_scheduler):
    few, _ = sample_images(digits_unet, digits_scheduler, 10, batch_size=10, **FAST)
    many, _ = sample_images(digits_unet, digits_scheduler, 30, batch_size=10, **FAST)
    torch.testing.assert_close(few, many[:10], rtol=0, atol=1e-5)


def test_samples_are_cpu_float32_in_model_shape(digits_unet, digits_scheduler):
    images, labels = sample_images(digits_unet, digits_scheduler, 12, **FAST)
    assert images.shape == (12, 1, 8, 8) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert labels.tolist() == [i % 10 for i in range(12)]


def test_callers_scheduler_is_not_mutated(digits_unet):
    scheduler = zoo.load_embedded_scheduler()
    before = scheduler.timesteps.clone()
    sample_images(digits_unet, scheduler, 4, **FAST)
    assert scheduler.num_inference_steps is None and torch.equal(scheduler.timesteps, before)


def test_class_labels_one_for_all_and_per_sample(digits_unet, digits_scheduler):
    _, labels = sample_images(digits_unet, digits_scheduler, 5, class_labels=7, **FAST)
    assert labels.tolist() == [7] * 5
    _, labels = sample_images(digits_unet, digits_scheduler, 3, class_labels=[1, 2, 3], **FAST)
    assert labels.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        sample_images(digits_unet, digits_scheduler, 2, class_labels=10, **FAST)
    with pytest.raises(ValueError, match="num_samples=3"):
        sample_images(digits_unet, digits_scheduler, 3, class_labels=[1, 2], **FAST)


def test_unconditional_denoiser_has_no_labels(digits_scheduler):
    torch.manual_seed(0)
    unet = UNet2DModel(**tiny_unet_config(num_class_embeds=None)).eval()
    images, labels = sample_images(unet, digits_scheduler, 3, **FAST)
    assert labels is None and images.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="takes no class labels"):
        sample_images(unet, digits_scheduler, 3, class_labels=1, **FAST)


def test_sample_size_and_channels_come_from_the_config(digits_scheduler):
    unet = UNet2DModel(**tiny_unet_config(sample_size=16, in_channels=3, out_channels=3)).eval()
    images, _ = sample_images(unet, digits_scheduler, 2, **FAST)
    assert images.shape == (2, 3, 16, 16)


def test_sampling_runs_in_the_denoisers_dtype(tiny_unet, digits_scheduler):
    full, _ = sample_images(tiny_unet, digits_scheduler, 4, **FAST)
    half, _ = sample_images(tiny_unet.to(torch.bfloat16), digits_scheduler, 4, **FAST)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.2 and not torch.equal(half, full)


@pytest.mark.parametrize(
    "scheduler_cls, kwargs",
    [(DDIMScheduler, dict(eta=1.0)), (DDPMScheduler, {}), (EulerAncestralDiscreteScheduler, {})],
)
def test_stochastic_schedulers_are_seeded_and_batch_size_independent(tiny_unet, digits_scheduler, scheduler_cls, kwargs):
    scheduler = scheduler_cls.from_config(digits_scheduler.config)
    a, _ = sample_images(tiny_unet, scheduler, 6, batch_size=6, **kwargs, **FAST)
    b, _ = sample_images(tiny_unet, scheduler, 6, batch_size=4, **kwargs, **FAST)
    c, _ = sample_images(tiny_unet, scheduler, 6, batch_size=6, seed=1, **kwargs, **FAST)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert not torch.allclose(a, c)


def test_eta_on_a_scheduler_without_eta_is_refused(tiny_unet, digits_scheduler):
    scheduler = DDPMScheduler.from_config(digits_scheduler.config)
    with pytest.raises(ValueError, match="eta"):
        sample_images(tiny_unet, scheduler, 2, eta=0.5, **FAST)


def test_image_grid_tiles_and_enlarges():
    grid = image_grid(torch.zeros(10, 1, 8, 8), nrow=5, scale=2, padding=1)
    assert grid.size == ((5 * 9 + 1) * 2, (2 * 9 + 1) * 2) and grid.mode == "L"
    assert image_grid(torch.zeros(3, 3, 4, 4)).mode == "RGB"


# -- metrics ---------------------------------------------------------------------------------------------------


def test_psnr_known_value_and_identical_images():
    a = torch.zeros(4, 1, 8, 8)
    assert psnr(a + 0.1, a) == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr(a, a) == math.inf


def test_psnr_clamps_to_model_range():
    a = torch.full((2, 1, 4, 4), 5.0)
    assert psnr(a, torch.ones_like(a)) == math.inf


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_the_analytic_value_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    n, mu_shift = 200_000, np.array([1.0, -2.0, 0.5])
    std_a, std_b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    a = rng.normal(size=(n, 3)) * std_a
    b = rng.normal(size=(n, 3)) * std_b + mu_shift
    analytic = (mu_shift**2).sum() + ((std_a - std_b) ** 2).sum()  # tr(Ca + Cb - 2 sqrt(Ca Cb)), diagonal
    assert analytic > 0
    assert frechet_distance(a, b) == pytest.approx(analytic, rel=0.02)


def test_frechet_distance_agrees_with_scipy_sqrtm():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    sqrt_prod = scipy.linalg.sqrtm(ca @ cb).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * sqrt_prod)
    assert frechet_distance(torch.from_numpy(a), b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="num_samples >= 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_classifier_accuracy_on_held_out_digits(digits_classifier):
    images, labels = load_digits_split("test")
    assert class_accuracy(digits_classifier, images, labels) > 0.95


def test_real_digits_score_far_better_than_noise(digits_classifier):
    gen = torch.Generator().manual_seed(0)
    test_images, _ = load_digits_split("test")
    train_images, _ = load_digits_split("train")
    real = classifier_features(digits_classifier, train_images)
    fd_real = frechet_distance(classifier_features(digits_classifier, test_images), real)
    gaussian = torch.randn(test_images.shape, generator=gen).clamp(-1, 1)
    uniform = torch.rand(test_images.shape, generator=gen) * 2 - 1
    fd_gaussian = frechet_distance(classifier_features(digits_classifier, gaussian), real)
    fd_uniform = frechet_distance(classifier_features(digits_classifier, uniform), real)
    assert fd_real * 10 < min(fd_gaussian, fd_uniform)


def test_metric_floor(digits_classifier):
    floor = metric_floor(digits_classifier)
    assert floor.accuracy > 0.95 and 0 < floor.fd
    assert floor.num_test + floor.num_train == 1797


def test_torchmetrics_fid_names_the_eval_extra_when_missing():
    if importlib.util.find_spec("torchmetrics") is not None:
        pytest.skip("torchmetrics is installed")
    with pytest.raises(ImportError, match=r"diffusers-gac\[eval\]"):
        torchmetrics_fid(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))


# -- evaluate_denoiser -----------------------------------------------------------------------------------------


def test_model_as_its_own_reference_samples_once_and_scores_like_an_explicit_reference(
        digits_unet, digits_scheduler, digits_classifier):
    calls = []
    handle = digits_unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        result = evaluate_denoiser(digits_unet, digits_scheduler, reference_unet=digits_unet, num_samples=20,
                                   classifier=digits_classifier, **FAST)
    finally:
        handle.remove()
    assert len(calls) == FAST["num_inference_steps"]  # one batch, sampled once: the samples are reused as reference
    samples, labels = sample_images(digits_unet, digits_scheduler, 20, **FAST)
    explicit = score_samples(samples, labels, reference_images=samples, classifier=digits_classifier)
    assert isinstance(result, EvalResult)
    assert (result.fd, result.psnr, result.accuracy) == (explicit["fd"], math.inf, explicit["accuracy"])
    assert (result.num_samples, result.num_inference_steps, result.seed) == (20, 4, 0)
    assert result.scheduler == "DDIMScheduler"


def test_a_second_load_of_the_model_reproduces_it_exactly(digits_unet, digits_scheduler, digits_classifier):
    reference = zoo.load_embedded_unet().eval()
    result = evaluate_denoiser(
        digits_unet, digits_scheduler, reference_unet=reference, num_samples=20, classifier=digits_classifier, **FAST
    )
    assert result.psnr == math.inf


def test_perturbed_model_has_finite_psnr_against_precomputed_reference(digits_unet, digits_scheduler, digits_classifier):
    reference, _ = sample_images(digits_unet, digits_scheduler, 20, seed=5, **FAST)
    perturbed = zoo.load_embedded_unet().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    result = evaluate_denoiser(
        perturbed, digits_scheduler, reference_images=reference, num_samples=20, seed=5, classifier=digits_classifier, **FAST
    )
    assert 10 < result.psnr < math.inf
    assert result.accuracy is not None and 0 <= result.accuracy <= 1 and result.fd > 0


def test_reference_images_of_another_size_are_refused(digits_unet, digits_scheduler, digits_classifier):
    with pytest.raises(ValueError, match="same num_samples"):
        evaluate_denoiser(
            digits_unet,
            digits_scheduler,
            reference_images=torch.zeros(3, 1, 8, 8),
            num_samples=4,
            classifier=digits_classifier,
            **FAST,
        )


def test_without_reference_psnr_is_skipped(digits_unet, digits_scheduler, digits_classifier):
    result = evaluate_denoiser(digits_unet, digits_scheduler, num_samples=10, classifier=digits_classifier, **FAST)
    assert result.psnr is None


def test_embedded_model_makes_recognisable_digits(digits_unet, digits_scheduler, digits_classifier):
    result = evaluate_denoiser(
        digits_unet, digits_scheduler, num_samples=100, num_inference_steps=25, classifier=digits_classifier,
        show_progress=False,
    )
    noise_fd = frechet_distance(
        classifier_features(digits_classifier, torch.rand(359, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1),
        classifier_features(digits_classifier, load_digits_split("test")[0]),
    )
    assert result.accuracy > 0.8
    assert result.fd < noise_fd / 5


def test_summarize_means_and_sample_std():
    runs = [
        EvalResult(fd=1.0, psnr=math.inf, accuracy=0.5, num_samples=8, num_inference_steps=4, seed=s,
                   scheduler="DDIMScheduler", sampling_seconds=0.1)
        for s in (0, 1)
    ]
    runs[1].fd, runs[1].accuracy = 3.0, 0.7
    summary = summarize(runs)
    assert summary["fd"] == 2.0 and summary["fd_std"] == pytest.approx(math.sqrt(2))
    assert summary["psnr"] == math.inf and summary["psnr_std"] == 0.0
    assert summary["accuracy"] == pytest.approx(0.6) and summary["seeds"] == [0, 1]
    single = summarize(runs[:1])
    assert single["fd_std"] is None
