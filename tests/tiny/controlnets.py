"""Tiny ControlNets for tests, and writers for the three layouts the loader reads.

Built from the tiny UNets' weights like `ControlNetModel.from_unet`, but with the values the real
families use where tensors cannot tell them (GroupNorm groups 32; SDXL: 64-channel heads and a 256-wide
time embedding), so they load through the shipped skeletons exactly like real files. Four
conditioning_embedding_out_channels because the LDM layout fixes the hint encoder's last index at 14.
The zero-convs are re-drawn non-zero, so a ControlNet visibly changes the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from tests.tiny import ldm

HINT_CHANNELS = (8, 8, 16, 16)


def _without_adapters(unet: torch.nn.Module) -> torch.nn.Module:
    """``unet`` itself, or — when an engine has run LoRAs on it (the test worlds' pipelines are shared, and the
    engine keeps its peft adapters loaded, disabled, between jobs) — a copy with only its base weights."""
    from diffusers import UNet2DConditionModel

    state = unet.state_dict()
    if not any(".base_layer." in key for key in state):
        return unet
    base = {key.replace(".base_layer.", "."): value for key, value in state.items()
            if ".lora_" not in key}
    plain = UNet2DConditionModel.from_config(unet.config)
    plain.load_state_dict(base, strict=True)
    return plain.eval()


def tiny_controlnet(unet: torch.nn.Module, *, seed: int = 7):
    """A ControlNet for the tiny `unet` (SD1.5 or SDXL), non-zero zero-convs, eval mode."""
    from diffusers import ControlNetModel

    unet = _without_adapters(unet)
    torch.manual_seed(seed)
    donor = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    overrides: dict = {"norm_num_groups": 32}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        overrides |= {"attention_head_dim": [max(1, w // 64) for w in unet.config.block_out_channels],
                      "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 6 * 256 + pooled}
    torch.manual_seed(seed)
    model = ControlNetModel.from_config({**donor.config, **overrides})
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in donor.state_dict().items() if own[k].shape == v.shape}, strict=False)
    with torch.no_grad():
        for block in [*model.controlnet_down_blocks, model.controlnet_mid_block, model.controlnet_cond_embedding.conv_out]:
            block.weight.normal_(0, 0.02)
            block.bias.normal_(0, 0.02)
    return model.eval()


def write_ldm(path: Path, controlnet, *, prefix: str = "control_model.", dtype: torch.dtype = torch.float32,
              fmt: Literal["safetensors", "ckpt"] = "safetensors") -> Path:
    """LDM layout (lllyasviel); prefix "" gives the bare form of the fp16 safetensors re-releases."""
    sd = {prefix + k: v for k, v in ldm.controlnet_to_ldm(controlnet).items()}
    return ldm.save_state_dict(ldm.cast(sd, dtype), path, fmt=fmt, wrap=False)


def write_diffusers_file(path: Path, controlnet) -> Path:
    """diffusers key layout in one safetensors file (how SDXL ControlNets are usually shared)."""
    return ldm.save_state_dict(controlnet.state_dict(), path)


def write_diffusers_folder(path: Path, controlnet) -> Path:
    controlnet.save_pretrained(path)
    return path
