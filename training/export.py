"""Write a peft-trained LoRA as a kohya / A1111 safetensors file.

The trainer adds peft LoRA adapters (adapter "default") to the UNet and text encoders, targeting the
modules kohya's ``networks.lora`` trains (``unet_lora_targets`` / ``text_encoder_lora_targets``).
``save_lora`` renames them to kohya's keys — ``lora_unet_*`` (SDXL in the SGM/LDM block names
sd-scripts writes), ``lora_te_*`` (SD1.5) or ``lora_te1_*`` / ``lora_te2_*`` (SDXL), each module with
``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` — and adds sd-scripts' ``sshs_model_hash`` /
``sshs_legacy_hash``. A1111, ComfyUI, kohya and our own engine load the result.

diffusers' ``convert_state_dict_to_kohya`` is not used: it writes alpha = rank and text-encoder names
without ``text_model_`` (offline-models.md §7).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from training.metadata import sshs_hashes

BASES = ("sd15", "sdxl")
ADAPTER = "default"

# kohya networks.lora trains the Linear (and 1x1 Conv2d) layers inside Transformer2DModel blocks and the
# CLIP attention / MLP layers. These suffixes only occur inside those blocks.
_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
_TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _check_base(base: str) -> None:
    if base not in BASES:
        raise ValueError(f"`base` must be one of {BASES}, got {base!r}")


def unet_lora_targets(base: str) -> list[str]:
    """peft ``target_modules`` for the UNet: kohya's default LoRA layers (attention blocks)."""
    _check_base(base)
    return list(_UNET_TARGETS)


def text_encoder_lora_targets() -> list[str]:
    """peft ``target_modules`` for a CLIP text encoder: attention projections and MLP layers."""
    return list(_TE_TARGETS)


def _sgm_module_name(module: str, layers_per_block: int) -> str:
    """diffusers UNet attention path -> the SGM/LDM path sd-scripts uses for SDXL LoRA keys."""
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        return f"input_blocks.{1 + int(m[1]) * (layers_per_block + 1) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        return f"output_blocks.{int(m[1]) * (layers_per_block + 1) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"UNet LoRA module {module!r} is outside the attention blocks; it has no SDXL (SGM) LoRA name")


def _lora_pairs(model: torch.nn.Module, what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (lora_A weight, lora_B weight) of the "default" adapter."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, sep, tail = key.rpartition(".lora_")
        if not sep or tail not in ("A.weight", "B.weight"):
            raise ValueError(f"{what}: unexpected adapter tensor {key!r} (only plain LoRA A/B weights are exported)")
        pairs.setdefault(module, {})[tail[0]] = value
    if not pairs:
        raise ValueError(f"{what}: the {ADAPTER!r} adapter holds no LoRA weights")
    return {m: (p["A"], p["B"]) for m, p in pairs.items()}


def _check_alpha(model: torch.nn.Module, what: str, network_alpha: float) -> None:
    """The file states one alpha per module; it must be the alpha the adapter was trained with."""
    config = getattr(model, "peft_config", {}).get(ADAPTER)
    if config is None:
        raise ValueError(f"{what} has no peft LoRA adapter named {ADAPTER!r}")
    if float(config.lora_alpha) != float(network_alpha) or getattr(config, "alpha_pattern", None) \
            or getattr(config, "rank_pattern", None) or getattr(config, "use_rslora", False):
        raise ValueError(f"{what}: adapter lora_alpha={config.lora_alpha} (patterns/rslora not supported) does not "
                         f"match network_alpha={network_alpha}")


def _kohya_tensors(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], prefix: str, alpha: float,
                   dtype: torch.dtype, rename=None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for module, (down, up) in pairs.items():
        name = prefix + (rename(module) if rename else module).replace(".", "_")
        out[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        out[f"{name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def _text_model_path(module: str) -> str:
    """transformers >= 5.6 flattens CLIPTextModel (no ``text_model.``); kohya names keep it."""
    return module if module.startswith("text_model.") else "text_model." + module


def lora_state_dict(*, unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module], base: str,
                    network_alpha: float, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The kohya tensors for the adapters on ``unet`` and ``text_encoders`` (see module docstring)."""
    _check_base(base)
    expected = 2 if base == "sdxl" else 1
    if len(text_encoders) not in (0, expected):
        raise ValueError(f"`text_encoders` for {base} must hold 0 or {expected} encoders, got {len(text_encoders)}")
    tensors: dict[str, torch.Tensor] = {}
    _check_alpha(unet, "unet", network_alpha)
    rename = None
    if base == "sdxl":
        layers = unet.config.layers_per_block
        if not isinstance(layers, int):
            raise ValueError(f"unet.config.layers_per_block must be an int for SGM names, got {layers!r}")
        rename = lambda module: _sgm_module_name(module, layers)  # noqa: E731
    tensors |= _kohya_tensors(_lora_pairs(unet, "unet"), "lora_unet_", network_alpha, dtype, rename)
    prefixes = ("lora_te1_", "lora_te2_") if base == "sdxl" else ("lora_te_",)
    for index, (prefix, encoder) in enumerate(zip(prefixes, text_encoders, strict=False)):
        what = f"text_encoders[{index}]"
        _check_alpha(encoder, what, network_alpha)
        pairs = {_text_model_path(m): p for m, p in _lora_pairs(encoder, what).items()}
        tensors |= _kohya_tensors(pairs, prefix, network_alpha, dtype)
    return tensors


def save_lora(path: Path, *, unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module], base: str,
              network_alpha: float, metadata: Mapping[str, str],
              dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """Write the adapters as a kohya LoRA at ``path`` (atomically, via ``.partial``); return its metadata.

    ``text_encoders`` is empty for a UNet-only LoRA, else (text_encoder,) for SD1.5 or
    (text_encoder, text_encoder_2) for SDXL. ``metadata`` values must be strings (``build_metadata``);
    ``sshs_model_hash`` / ``sshs_legacy_hash`` are added.
    """
    from safetensors.torch import save_file

    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata values must be str; not for {bad}")
    tensors = lora_state_dict(unet=unet, text_encoders=text_encoders, base=base, network_alpha=network_alpha,
                              dtype=dtype)
    final = dict(metadata) | sshs_hashes(tensors, metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    try:
        save_file(tensors, str(partial), metadata=final)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return final
