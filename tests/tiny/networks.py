"""Real-format network files (kohya LoRA / LoCon, A1111 textual inversion and hypernetwork, A1111 VAE)
written from the tiny pipelines, deterministic by seed.

The files have exactly the layout users download from Civitai, so loaders are tested against the
formats they meet in production rather than against diffusers' own serialisation. The pipeline passed
in is never modified: adapters are trained on a deep copy.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Literal

import torch

from tests.tiny import ldm

_UNET_LINEAR = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
_TE_LINEAR = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _unet_targets(unet: torch.nn.Module, conv: bool) -> list[str]:
    """Module paths kohya's networks.lora trains: transformer linears; with `conv`, resnet and sampler convs too."""
    targets = []
    for name, module in unet.named_modules():
        transformer_linear = ".attentions." in f".{name}" and name.endswith(_UNET_LINEAR) \
            and isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
        conv_layer = conv and (".resnets." in name or "samplers.0" in name) and isinstance(module, torch.nn.Conv2d)
        if transformer_linear or conv_layer:
            targets.append(name)
    return targets


def _te_targets(text_encoder: torch.nn.Module) -> list[str]:
    return [n for n, m in text_encoder.named_modules() if n.endswith(_TE_LINEAR) and isinstance(m, torch.nn.Linear)]


def _peft_lora(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    """Random (non-zero) peft LoRA weights for `targets` of a copy of `model`, keyed `<module>.lora_A/B.weight`."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    work = copy.deepcopy(model)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets)
    work.add_adapter(config)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(work).items()}
    del work
    return state


def _kohya(state: dict[str, torch.Tensor], prefix: str, alpha: float, rename=None) -> dict[str, torch.Tensor]:
    """peft `a.b.lora_A.weight` -> kohya `<prefix>a_b.lora_down.weight` (+ `.alpha` per module)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".lora_")
        if rename is not None:
            module = rename(module)
        name = prefix + module.replace(".", "_")
        part = "lora_down" if kind.startswith("A") else "lora_up"
        out[f"{name}.{part}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def _sgm_renamer(unet: torch.nn.Module):
    """Module path in diffusers names -> the sgm (LDM) names sd-scripts writes for SDXL."""
    layers = unet.config.layers_per_block
    up_attn = ["CrossAttn" in t for t in unet.config.up_block_types]

    def rename(module: str) -> str:
        return ldm._unet_key(module + ".weight", layers, up_attn).removesuffix(".weight")

    return rename


def kohya_state_dict(
    pipe, *, rank: int = 4, alpha: float = 4.0, seed: int = 0, unet: bool = True, text_encoder: bool = True,
    sdxl_names: Literal["diffusers", "sgm"] = "diffusers", conv: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of a kohya LoRA for `pipe` (see `write_kohya_lora`)."""
    if sdxl_names not in ("diffusers", "sgm"):
        raise ValueError(f"sdxl_names must be 'diffusers' or 'sgm', got {sdxl_names!r}")
    sdxl = _is_sdxl(pipe)
    tensors: dict[str, torch.Tensor] = {}
    if unet:
        state = _peft_lora(pipe.unet, _unet_targets(pipe.unet, conv), rank, alpha, seed)
        rename = _sgm_renamer(pipe.unet) if sdxl and sdxl_names == "sgm" else None
        tensors |= _kohya(state, "lora_unet_", alpha, rename)
    if text_encoder:
        encoders = [("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)] if sdxl \
            else [("lora_te_", pipe.text_encoder)]
        for offset, (prefix, encoder) in enumerate(encoders, start=1):
            if encoder is None:  # the SDXL refiner has no CLIP-L
                continue
            state = _peft_lora(encoder, _te_targets(encoder), rank, alpha, seed + offset)
            state = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}
            tensors |= _kohya(state, prefix, alpha)
    if not tensors:
        raise ValueError("a LoRA needs the UNet or a text encoder (unet=False and text_encoder=False given)")
    return tensors


def _body_sha256(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sd-scripts' `sshs_model_hash`: sha256 of the tensor bytes of a safetensors serialisation."""
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header:]).hexdigest()


def write_kohya_lora(
    path: Path, pipe, *, rank: int = 4, alpha: float = 4.0, seed: int = 0, unet: bool = True,
    text_encoder: bool = True, sdxl_names: Literal["diffusers", "sgm"] = "diffusers", conv: bool = False,
    ss_metadata: bool = True, sshs_hash: bool = False, name: str | None = None,
) -> Path:
    """Write a kohya / A1111 LoRA (LoCon with `conv=True`) safetensors file made from peft weights.

    `sdxl_names="sgm"` names SDXL UNet modules the way sd-scripts does (`input_blocks_4_1_...`).
    `ss_metadata` adds sd-scripts' `ss_*` header fields; `sshs_hash` adds `sshs_model_hash` /
    `sshs_legacy_hash` computed the way sd-scripts does, so hash code can be checked against it.
    """
    tensors = kohya_state_dict(
        pipe, rank=rank, alpha=alpha, seed=seed, unet=unet, text_encoder=text_encoder,
        sdxl_names=sdxl_names, conv=conv,
    )
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata: dict[str, str] = {}
    if ss_metadata:
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sdxl_base_v1-0" if _is_sdxl(pipe) else "sd_v1",
            "ss_output_name": name or path.stem,
            "ss_v2": "False",
        }
        if conv:
            metadata["ss_network_args"] = json.dumps({"conv_dim": str(rank), "conv_alpha": str(alpha)})
    if sshs_hash:
        from safetensors.torch import save

        metadata["sshs_model_hash"] = _body_sha256(tensors, metadata)
        blob = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
        metadata["sshs_legacy_hash"] = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata or None)
    return path


def _embedding_vectors(encoder: torch.nn.Module, vectors: int, generator: torch.Generator) -> torch.Tensor:
    """Random vectors with the spread of the encoder's own token embeddings (so prompts stay in range)."""
    table = encoder.get_input_embeddings().weight.detach()
    return torch.randn(vectors, table.shape[1], generator=generator) * table.std() + table.mean()


def write_textual_inversion(
    path: Path, pipe, *, vectors: int = 1, seed: int = 0, fmt: Literal["pt", "safetensors", "sdxl"] = "pt",
    name: str | None = None,
) -> Path:
    """Write an embedding as A1111 `.pt`, A1111/Civitai `{"emb_params"}` safetensors or SDXL `{clip_l, clip_g}`."""
    if vectors < 1:
        raise ValueError(f"vectors must be at least 1, got {vectors}")
    generator = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "sdxl":
        if not _is_sdxl(pipe) or pipe.text_encoder is None:
            raise ValueError("fmt='sdxl' needs an SDXL base pipeline (text_encoder and text_encoder_2)")
        from safetensors.torch import save_file

        save_file({
            "clip_l": _embedding_vectors(pipe.text_encoder, vectors, generator).contiguous(),
            "clip_g": _embedding_vectors(pipe.text_encoder_2, vectors, generator).contiguous(),
        }, str(path))
        return path
    params = _embedding_vectors(pipe.text_encoder, vectors, generator)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({"emb_params": params.contiguous()}, str(path))
    elif fmt == "pt":
        torch.save({
            "string_to_token": {"*": 265},
            "string_to_param": {"*": params},
            "name": name or path.stem,
            "step": 500,
            "sd_checkpoint": "a9263745",
            "sd_checkpoint_name": "tiny",
        }, path)
    else:
        raise ValueError(f"unknown embedding format {fmt!r}; use 'pt', 'safetensors' or 'sdxl'")
    return path


_ACTIVATIONS = {
    "linear": None, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "gelu": torch.nn.GELU,
    "mish": torch.nn.Mish, "silu": torch.nn.SiLU,
}


def _hypernetwork_mlp(dim: int, layer_structure: tuple[float, ...], activation: str, layer_norm: bool,
                      generator: torch.Generator) -> torch.nn.Sequential:
    """The residual MLP of one A1111 HypernetworkModule; Sequential indices give the file's `linear.{i}` keys."""
    layers: list[torch.nn.Module] = []
    last = len(layer_structure) - 2
    for i in range(len(layer_structure) - 1):
        width_in, width_out = int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])
        linear = torch.nn.Linear(width_in, width_out)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(width_out, width_in, generator=generator) / width_in**0.5)
            linear.bias.copy_(torch.randn(width_out, generator=generator) * 0.05)
        layers.append(linear)
        act = _ACTIVATIONS[activation]
        if act is not None and i < last:
            layers.append(act())
        if layer_norm:
            layers.append(torch.nn.LayerNorm(width_out))
    return torch.nn.Sequential(*layers)


def hypernetwork_dims(unet: torch.nn.Module) -> list[int]:
    """Context widths reaching `to_k` in the UNet's attentions (self: channel widths; cross: text width)."""
    from diffusers.models.attention_processor import Attention

    return sorted({m.to_k.in_features for m in unet.modules() if isinstance(m, Attention)})


def write_hypernetwork(
    path: Path, pipe, *, seed: int = 0, layer_structure: tuple[float, ...] = (1, 2, 1), activation: str = "relu",
    layer_norm: bool = False, name: str | None = None,
) -> Path:
    """Write an A1111 hypernetwork `.pt` with one (k, v) module pair per context width of the UNet."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}")
    if len(layer_structure) < 2 or layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise ValueError(f"layer_structure must start and end with 1, got {layer_structure!r}")
    generator = torch.Generator().manual_seed(seed)
    data: dict = {}
    for dim in hypernetwork_dims(pipe.unet):
        pair = tuple(
            {f"linear.{k}": v for k, v in _hypernetwork_mlp(dim, layer_structure, activation, layer_norm,
                                                            generator).state_dict().items()}
            for _ in range(2)
        )
        data[dim] = pair
    data |= {
        "step": 1000, "name": name or path.stem, "layer_structure": list(layer_structure),
        "activation_func": activation, "is_layer_norm": layer_norm, "weight_initialization": "Normal",
        "sd_checkpoint": "a9263745", "sd_checkpoint_name": "tiny", "activate_output": False,
        "use_dropout": False, "dropout_structure": [0.0] * len(layer_structure), "last_layer_dropout": False,
        "optional_info": "tiny test hypernetwork",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return path


def write_vae(path: Path, seed: int = 5, fmt: Literal["safetensors", "ckpt"] = "safetensors",
              dtype: torch.dtype = torch.float32) -> Path:
    """Write `tiny_vae(seed)` as a standalone A1111 VAE (LDM keys, no `first_stage_model.` prefix)."""
    from tests.tiny.models import tiny_vae

    sd = ldm.cast(ldm.vae_to_ldm(tiny_vae(seed)), dtype)
    return ldm.save_state_dict(sd, path, fmt=fmt)


def _kohya_modules(pipe) -> dict[str, torch.nn.Module]:
    """Every kohya module name (diffusers and sgm spellings) of `pipe` -> its module."""
    names: dict[str, torch.nn.Module] = {}
    rename = _sgm_renamer(pipe.unet) if _is_sdxl(pipe) else None
    for path, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            names["lora_unet_" + path.replace(".", "_")] = module
            if rename is not None and path.startswith(("down_blocks", "up_blocks", "mid_block")):
                names["lora_unet_" + rename(path).replace(".", "_")] = module
    encoders = [("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)] if _is_sdxl(pipe) \
        else [("lora_te_", pipe.text_encoder)]
    for prefix, encoder in encoders:
        if encoder is None:
            continue
        for path, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear):
                full = path if path.startswith("text_model.") else "text_model." + path
                names[prefix + full.replace(".", "_")] = module
    return names


def merged_copy(pipe, lora: Path | dict[str, torch.Tensor], multiplier: float = 1.0):
    """A deep copy of `pipe` with a kohya LoRA merged by hand: W += m * alpha / rank * up @ down.

    This is the reference the LoRA loaders are checked against; it follows the kohya format
    definition, not diffusers' converter.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(lora)) if isinstance(lora, Path) else lora
    out = copy.deepcopy(pipe)
    modules = _kohya_modules(out)
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        if name not in modules:
            raise KeyError(f"LoRA module {name!r} not found in the pipeline")
        up = tensors[f"{name}.lora_up.weight"]
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else rank
        weight = modules[name].weight
        delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight.shape)
        with torch.no_grad():
            weight += (multiplier * (alpha or rank) / rank * delta).to(weight.dtype)
    return out
