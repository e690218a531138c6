"""Training of the embedded digits model and of the digits classifier used by the metrics.

Both run on any device; on 2 CPU cores the defaults regenerate the shipped files in well under 30 minutes
(see ``docs/embedded-model.md`` for the recorded log).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from diffusers.utils import logging as dlogging
from tqdm.auto import tqdm

from .classifier import DigitsClassifier
from .data import IMAGE_SIZE, NUM_CLASSES, load_digits_split

logger = dlogging.get_logger(__name__)


def digits_unet_config() -> dict:
    """The architecture of the embedded model (about 1.1M parameters)."""
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
        num_class_embeds=NUM_CLASSES,
    )


def digits_scheduler() -> DDPMScheduler:
    """The training noise schedule: linear betas 1e-4..0.02 over 1000 steps, epsilon prediction."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
    )


def warmup_cosine(step: int, warmup_steps: int, steps: int) -> float:
    """Learning-rate factor of the embedded models' training: linear warm-up, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def noise_prediction_loss(unet: UNet2DModel, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                          alphas_cumprod: torch.Tensor, **conditioning) -> torch.Tensor:
    """The epsilon-prediction loss of ``unet`` on ``x0`` noised to timesteps ``t`` with ``noise``."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(unet(xt, t, **conditioning).sample, noise)


@dataclass
class DiffusionTrainingArgs:
    steps: int = 8000
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 500


def train_digits_unet(
    args: DiffusionTrainingArgs, device: str | torch.device = "cpu", log_path: str | Path | None = None
) -> tuple[UNet2DModel, DDPMScheduler, list[dict]]:
    """Train the class-conditional digits UNet on the training split and return ``(ema_unet, scheduler, log)``."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_split("train")
    images, labels = images.to(device), labels.to(device)
    unet = UNet2DModel(**digits_unet_config()).to(device)
    scheduler = digits_scheduler()
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=0.0)

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, args.warmup_steps, args.steps))
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    log: list[dict] = []
    running, start = 0.0, time.time()
    for step in tqdm(range(args.steps), desc="train digits unet"):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen).to(device)
        x0, y = images[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen).to(device)
        loss = noise_prediction_loss(unet, x0, noise, t, alphas_cumprod, class_labels=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        running += loss.item()
        if (step + 1) % args.log_every == 0:
            entry = {"step": step + 1, "loss": running / args.log_every, "elapsed_s": round(time.time() - start, 1)}
            log.append(entry)
            logger.info(json.dumps(entry))
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            running = 0.0
    ema_unet = copy.deepcopy(unet)
    ema.copy_to(ema_unet.parameters())
    return ema_unet.eval(), scheduler, log


@dataclass
class ClassifierTrainingArgs:
    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0


def train_digits_classifier(args: ClassifierTrainingArgs, device: str | torch.device = "cpu") -> tuple[DigitsClassifier, float]:
    """Train the feature network for the metrics on the training split; return it with its held-out accuracy.

    Light augmentation (one-pixel shifts, small noise) keeps it sensible on generated images, which are never
    exactly like the real ones.
    """
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = load_digits_split("train")
    xt, yt = load_digits_split("test")
    model = DigitsClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    for _ in tqdm(range(args.epochs), desc="train digits classifier"):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), args.batch_size):
            b = perm[i : i + args.batch_size]
            xb = x[b]
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            xb = (xb + 0.1 * torch.randn(xb.shape, generator=gen)).clamp(-1, 1)
            loss = F.cross_entropy(model(xb.to(device)), y[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xt.to(device)).argmax(-1).cpu() == yt).float().mean().item()
    return model, acc


def save_training_args(path: Path, *args_objs) -> None:
    path.write_text(json.dumps({type(a).__name__: asdict(a) for a in args_objs}, indent=2) + "\n")
