"""Writers from diffusers models to A1111 / LDM ("original Stable Diffusion") single-file layout.

diffusers ships only LDM -> diffusers converters, and the repository's reverse scripts assume four
blocks of two resnets. Tests need files in the layout real checkpoints have, for any block count, so
the mapping (../shared/reference/offline-models.md §6) is written here once and used by the
fixtures, the full-size test and the benchmark. Every function works on the module's state dict
without copying tensors, so a 2 GB model is converted without doubling memory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}
_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}


def _resnet_tail(tail: str) -> str:
    """Rename a key inside a ResnetBlock2D ('conv1.weight' -> 'in_layers.2.weight')."""
    module, _, param = tail.partition(".")
    return f"{_RESNET[module]}.{param}"


def _unet_key(key: str, layers: int, up_has_attention: list[bool]) -> str:
    """Map one diffusers UNet / ControlNet-body key to its LDM name (without the model prefix)."""
    for src, dst in _TOP.items():
        if key.startswith(src + "."):
            return dst + key[len(src):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + i * (layers + 1) + j
        return f"input_blocks.{index}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"input_blocks.{index}.1.{tail}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        index = i * (layers + 1) + j
        return f"output_blocks.{index}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"output_blocks.{index}.1.{tail}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        i = int(m[1])
        slot = 2 if up_has_attention[i] else 1
        return f"output_blocks.{i * (layers + 1) + layers}.{slot}.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, j, tail = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{tail}"
        return f"middle_block.{0 if j == 0 else 2}.{_resnet_tail(tail)}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def unet_to_ldm(unet: torch.nn.Module) -> StateDict:
    """UNet2DConditionModel state dict in LDM names (no `model.diffusion_model.` prefix)."""
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError(f"per-block layers_per_block {layers!r} has no LDM layout")
    up_attn = ["CrossAttn" in t for t in unet.config.up_block_types]
    return {_unet_key(k, layers, up_attn): v for k, v in unet.state_dict().items()}


def controlnet_to_ldm(controlnet: torch.nn.Module) -> StateDict:
    """ControlNetModel state dict in LDM names (no `control_model.` prefix).

    The hint block index 14 is fixed in the LDM layout, so the model needs four
    conditioning_embedding_out_channels.
    """
    layers = controlnet.config.layers_per_block
    hint_blocks = len(controlnet.config.conditioning_embedding_out_channels)
    if hint_blocks != 4:
        raise ValueError(f"LDM ControlNet layout needs 4 conditioning_embedding_out_channels, got {hint_blocks}")
    out: StateDict = {}
    for key, value in controlnet.state_dict().items():
        if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
            out[f"zero_convs.{m[1]}.0.{m[2]}"] = value
        elif key.startswith("controlnet_mid_block."):
            out["middle_block_out.0." + key.split(".", 1)[1]] = value
        elif key.startswith("controlnet_cond_embedding.conv_in."):
            out["input_hint_block.0." + key.rsplit(".", 1)[1]] = value
        elif m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
            out[f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"] = value
        elif key.startswith("controlnet_cond_embedding.conv_out."):
            out["input_hint_block.14." + key.rsplit(".", 1)[1]] = value
        else:
            out[_unet_key(key, layers, [])] = value
    return out


def _vae_key(key: str, n_blocks: int) -> tuple[str, bool]:
    """Map a diffusers AutoencoderKL key to LDM; the flag says a 2-D attention weight needs [o, i, 1, 1]."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}", m[2] != "group_norm" and m[3] == "weight"
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}", False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.{m[2]}", False
    return key, False


def vae_to_ldm(vae: torch.nn.Module) -> StateDict:
    """AutoencoderKL state dict in LDM names (no `first_stage_model.` prefix) = a standalone A1111 VAE."""
    n_blocks = len(vae.config.block_out_channels)
    out: StateDict = {}
    for key, value in vae.state_dict().items():
        name, reshape = _vae_key(key, n_blocks)
        out[name] = value.reshape(*value.shape, 1, 1) if reshape and value.ndim == 2 else value
    return out


def clip_l_to_ldm(text_encoder: torch.nn.Module) -> StateDict:
    """CLIP-L text encoder as `transformer.text_model.*` (prefix with cond_stage_model. / embedders.0.)."""
    out: StateDict = {}
    for key, value in text_encoder.state_dict().items():
        if key.startswith("text_projection."):
            continue
        body = key if key.startswith("text_model.") else "text_model." + key
        out["transformer." + body] = value
    return out


def open_clip_to_ldm(text_encoder: torch.nn.Module) -> StateDict:
    """A CLIPTextModelWithProjection as OpenCLIP `model.*` keys (SDXL bigG / refiner encoder)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out: StateDict = {
        "model.token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "model.positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "model.ln_final.weight": sd.pop("final_layer_norm.weight"),
        "model.ln_final.bias": sd.pop("final_layer_norm.bias"),
        "model.text_projection": sd.pop("text_projection.weight").T.contiguous(),
    }
    sd.pop("embeddings.position_ids", None)
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"model.transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(src + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")], dim=0
            )
        for key in [k for k in sd if k.startswith(src)]:
            tail = key[len(src):]
            module, _, param = tail.rpartition(".")
            out[dst + f"{names[module]}.{param}"] = sd.pop(key)
    if sd:
        raise KeyError(f"unmapped OpenCLIP keys: {sorted(sd)[:5]}")
    return out


def _prefixed(prefix: str, sd: Mapping[str, Tensor]) -> StateDict:
    return {prefix + k: v for k, v in sd.items()}


def pipeline_to_ldm(pipe) -> StateDict:
    """A whole SD1.x / SDXL base / SDXL refiner pipeline as one LDM state dict."""
    sd = _prefixed("model.diffusion_model.", unet_to_ldm(pipe.unet))
    sd |= _prefixed("first_stage_model.", vae_to_ldm(pipe.vae))
    if getattr(pipe, "text_encoder_2", None) is None:
        sd |= _prefixed("cond_stage_model.", clip_l_to_ldm(pipe.text_encoder))
    elif pipe.text_encoder is None:  # refiner: OpenCLIP only, at index 0
        sd |= _prefixed("conditioner.embedders.0.", open_clip_to_ldm(pipe.text_encoder_2))
    else:
        sd |= _prefixed("conditioner.embedders.0.", clip_l_to_ldm(pipe.text_encoder))
        sd |= _prefixed("conditioner.embedders.1.", open_clip_to_ldm(pipe.text_encoder_2))
    return sd


def add_extras(sd: StateDict, pipe, *, ema: bool = True) -> StateDict:
    """Add what real A1111-era files carry besides the weights: position_ids, schedule buffers, EMA.

    EMA copies use LDM's dot-less naming (`model_ema.diffusion_modelinput_blocks00weight`) and
    are perturbed so that a loader wrongly picking them would change the image.
    """
    out = dict(sd)
    if "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd:
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    out["betas"] = betas.float()
    out["alphas_cumprod"] = alphas_cumprod.float()
    out["alphas_cumprod_prev"] = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]).float()
    if ema:
        out["model_ema.decay"] = torch.tensor(0.9999)
        out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
        for key, value in sd.items():
            if key.startswith("model.diffusion_model."):
                name = "model_ema." + key.removeprefix("model.").replace(".", "")
                out[name] = value + 0.01 if value.is_floating_point() else value
    return out


def cast(sd: Mapping[str, Tensor], dtype: torch.dtype) -> StateDict:
    """Cast floating tensors (integers such as position_ids stay as they are)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def save_state_dict(
    sd: Mapping[str, Tensor], path: Path, *, fmt: Literal["safetensors", "ckpt"] = "safetensors",
    metadata: dict[str, str] | None = None, wrap: bool = True,
) -> Path:
    """Write safetensors, or a pickle the way LDM trainers did (`{"state_dict": ..., "global_step": N}`).

    Only plain containers, ints and tensors go into the pickle, so `torch.load(weights_only=True)`
    opens it — as real checkpoints saved by PyTorch Lightning do.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in sd.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)
    elif fmt == "ckpt":
        torch.save({"state_dict": tensors, "global_step": 1000, "epoch": 1} if wrap else tensors, path)
    else:
        raise ValueError(f"unknown format {fmt!r}; use 'safetensors' or 'ckpt'")
    return path


def write_checkpoint(
    path: Path, pipe, *, dtype: torch.dtype = torch.float32, extras: bool = False,
    fmt: Literal["safetensors", "ckpt"] = "safetensors",
) -> Path:
    """Write a pipeline as an A1111 single-file checkpoint (fp16/fp32, optional EMA and buffers)."""
    sd = pipeline_to_ldm(pipe)
    if extras:
        sd = add_extras(sd, pipe)
    return save_state_dict(cast(sd, dtype), path, fmt=fmt)


def write_controlnet(
    path: Path, controlnet: torch.nn.Module, *, dtype: torch.dtype = torch.float32,
    fmt: Literal["safetensors", "ckpt"] = "safetensors",
) -> Path:
    """Write a ControlNetModel in the LDM layout of the original SD1.5 ControlNet releases."""
    sd = _prefixed("control_model.", controlnet_to_ldm(controlnet))
    return save_state_dict(cast(sd, dtype), path, fmt=fmt)


_ST_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32"}


def save_streaming(path: Path, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]], make,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write safetensors one tensor at a time: `make(name)` is called per tensor and dropped after writing.

    Peak memory is one tensor, so multi-GB files can be produced on a small CI machine.
    """
    import json
    import math

    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (shape, dtype) in layout.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, (shape, dtype) in layout.items():
            tensor = make(name).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: made shape {tuple(tensor.shape)}, layout says {shape}")
            f.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return path
