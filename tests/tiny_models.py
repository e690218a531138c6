"""Tiny randomly initialised diffusers denoisers of every family the converter supports."""

import torch
from diffusers import DiTTransformer2DModel, Transformer2DModel, UNet2DConditionModel, UNet2DModel


def tiny_unet2d(class_conditional: bool = True) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=10 if class_conditional else None,
    ).eval()


def tiny_unet2d_condition(cross_attention_dim: int = 12) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=4,
    ).eval()


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4,
    ).eval()


def tiny_transformer2d() -> Transformer2DModel:
    torch.manual_seed(0)
    return Transformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=8, num_layers=1, norm_num_groups=4,
        cross_attention_dim=12,
    ).eval()


def example_call(model, batch: int = 4, seed: int = 0) -> dict:
    """Keywords of one denoiser call with random inputs of the right shapes."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    size = cfg.sample_size if cfg.get("sample_size") else 8
    call = {"timestep": torch.randint(0, 1000, (batch,), generator=g)}
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    if isinstance(model, (DiTTransformer2DModel, Transformer2DModel)):
        call["hidden_states"] = x
    else:
        call["sample"] = x
    if isinstance(model, DiTTransformer2DModel) or (isinstance(model, UNet2DModel) and cfg.num_class_embeds):
        call["class_labels"] = torch.randint(0, 10, (batch,), generator=g)
    if cfg.get("cross_attention_dim"):
        call["encoder_hidden_states"] = torch.randn(batch, 3, cfg.cross_attention_dim, generator=g)
    return call


# -- tiny pipelines: randomly initialised, built offline --------------------------------------------------------

def tiny_clip_tokenizer():
    """A character-level CLIP tokenizer (no download): every lower-case letter is a token."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8)


def tiny_sd_pipeline():
    """A Stable-Diffusion-style pipeline: AutoencoderKL, CLIP text encoder, UNet2DConditionModel, DDIM. Widths are
    multiples of 64 so that bitsandbytes' CPU 4-bit kernels accept the text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet2d_condition(cross_attention_dim=64),
                                   scheduler=DDIMScheduler(num_train_timesteps=1000), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def tiny_ldm_pipeline():
    """An unconditional latent-diffusion pipeline: VQModel, UNet2DModel on its latents, DDIM."""
    from diffusers import DDIMScheduler, LDMPipeline, VQModel

    torch.manual_seed(0)
    vqvae = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                    latent_channels=3, norm_num_groups=4, num_vq_embeddings=16, sample_size=16).eval()
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8).eval()
    return LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))


def tiny_dit_pipeline():
    """A class-conditional latent transformer pipeline (DiT): AutoencoderKL, DiTTransformer2DModel, DDIM. DiT's
    pipeline uses class 1000 as the unconditional label, hence 1000 label embeddings."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=4,
    ).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=1000))


def digits_call(seed: int = 0) -> dict:
    """A fixed batch of inputs for the embedded digits model: four noisy 8x8 samples across the schedule."""
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(4, 1, 8, 8, generator=g), timestep=torch.tensor([10, 300, 600, 950]),
                class_labels=torch.tensor([0, 3, 5, 9]))


def digits_out(model, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(**digits_call(seed)).sample


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` loaded as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
