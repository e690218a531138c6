"""Training of the photo-patches benchmark model: an unconditional RGB ``UNet2DModel`` on 16x16 photo patches.

``python examples/train_embedded_model.py --model photos --output diffusers_gac/zoo/photos`` trains the feature
network for the FD (``photos_features``) and then the UNet (EMA weights) on the training split of ``photos_data``,
and writes::

    <output>/unet/                 UNet2DModel.save_pretrained (EMA weights)
    <output>/scheduler/            the DDPM training schedule (sample and calibrate with DDIM over it)
    <output>/features/             the feature network (config.json + model.safetensors)
    <output>/training_log.jsonl    mean loss every ``log_every`` steps, with wall and process CPU time
    <output>/training_args.json    the arguments and the timing of the run

Everything is seeded (see ``docs/embedded-model.md`` for the recorded run).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from diffusers.utils import logging as dlogging

from .photos_data import PATCH_SIZE, PatchSampler
from .training import digits_scheduler, noise_prediction_loss, warmup_cosine


logger = dlogging.get_logger(__name__)


def photos_unet_config() -> dict:
    """The architecture: 3 levels (16, 8, 4 px) of 32/64/128 channels, one ResNet each, attention at 4x4."""
    return dict(
        sample_size=PATCH_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
    )


def photos_scheduler() -> DDPMScheduler:
    """The training noise schedule, the digits model's: linear betas 1e-4..0.02 over 1000 steps, epsilon
    prediction."""
    return digits_scheduler()


@dataclass
class PhotosTrainingArgs:
    """UNet training: AdamW with linear warm-up then cosine decay, gradient clipping at 1.0, EMA of the weights."""

    steps: int = 4500
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 300
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 250


def train_photos_unet(
    args: PhotosTrainingArgs, device: str | torch.device = "cpu", log_path: str | Path | None = None
) -> tuple[UNet2DModel, DDPMScheduler, list[dict]]:
    """Train the unconditional UNet on fresh training-split patches; return ``(ema_unet, scheduler, log)``.

    Each step draws ``batch_size`` new patches, timesteps and noise from seeded CPU generators, so the run depends
    only on ``args`` (and on the floating-point behaviour of ``device``). Every ``log_every`` steps the mean loss is
    appended to ``log`` (and to ``log_path`` as one JSON line).
    """
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    sampler = PatchSampler("train", seed=args.seed)
    unet = UNet2DModel(**photos_unet_config()).to(device)
    scheduler = photos_scheduler()
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, args.warmup_steps, args.steps))
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    num_train_timesteps = scheduler.config.num_train_timesteps
    log: list[dict] = []
    running = 0.0
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    unet.train()
    for step in range(args.steps):
        x0 = sampler.sample(args.batch_size)[0].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, num_train_timesteps, (args.batch_size,), generator=gen).to(device)
        loss = noise_prediction_loss(unet, x0, noise, t, alphas_cumprod)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        running += loss.item()
        if (step + 1) % args.log_every == 0:
            entry = {
                "step": step + 1,
                "loss": round(running / args.log_every, 5),
                "lr": lr_sched.get_last_lr()[0],
                "elapsed_s": round(time.perf_counter() - start_wall, 1),
                "cpu_s": round(time.process_time() - start_cpu, 1),
            }
            log.append(entry)
            logger.info(json.dumps(entry))
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            running = 0.0
    ema_unet = copy.deepcopy(unet)
    ema.copy_to(ema_unet.parameters())
    return ema_unet.eval(), scheduler, log
