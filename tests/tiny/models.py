"""Tiny randomly initialised Stable Diffusion components, built in code with fixed seeds.

Nothing here touches the network: the tokenizer is a byte-level CLIP BPE vocabulary written to disk
(every byte is a token, so no prompt is ever unknown), and every model is constructed from a config.
Shapes follow ../shared/reference/offline-models.md §3-4 so that latents have production layouts (H/8).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Words that get whole-word BPE merges, so prompts in tests tokenise to few tokens.
_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "house", "tree", "masterpiece", "portrait")
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode mapping."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_tiny_tokenizer(directory: Path) -> Path:
    """Write vocab.json + merges.txt of a ~550-token byte-level CLIP vocabulary; return the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
                if merged not in vocab:
                    vocab.append(merged)
            parts = [merged] + parts[2:]
    vocab += [BOS, EOS]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return directory


def tiny_tokenizer(directory: Path, pad_token: str = EOS):
    from transformers import CLIPTokenizer

    write_tiny_tokenizer(directory)
    return CLIPTokenizer(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"),
        model_max_length=77, pad_token=pad_token,
    )


def _text_config(vocab_size: int, hidden: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden, intermediate_size=37 if hidden == 32 else hidden * 2, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, vocab_size=vocab_size, hidden_act="gelu",
        projection_dim=hidden, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1, **extra,
    )


def tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, layers_per_block=1, norm_num_groups=4,
    )


def tiny_sd15_unet(seed: int = 0, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
    )


def tiny_sd15(tokenizer_dir: Path, seed: int = 0, in_channels: int = 4):
    """A tiny SD1.5 pipeline (in_channels=9 gives the inpainting variant)."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = tiny_tokenizer(tokenizer_dir)
    unet = tiny_sd15_unet(seed, in_channels)
    vae = tiny_vae(seed + 1)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), 32))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    pipe = cls(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(tokenizer_dir: Path, seed: int = 0, refiner: bool = False):
    """A tiny SDXL base pipeline (te1 width 32, te2 width 64 — the widths must differ for single-file loading).

    With ``refiner=True`` it is a refiner: only the OpenCLIP-style encoder, aesthetic-score conditioning.
    """
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer(tokenizer_dir)
    tokenizer_2 = tiny_tokenizer(tokenizer_dir, pad_token="!")
    te2_width = 64
    # base: 6 time ids x 8 + pooled 64 = 112; refiner: 5 time ids (aesthetic score) x 8 + 64 = 104
    time_ids = 5 if refiner else 6
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=time_ids * 8 + te2_width,
        cross_attention_dim=te2_width if refiner else 32 + te2_width, use_linear_projection=True, norm_num_groups=8,
    )
    vae = tiny_vae(seed + 1)
    torch.manual_seed(seed + 2)
    text_encoder = None if refiner else CLIPTextModel(_text_config(len(tokenizer), 32))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer), te2_width))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
            unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
