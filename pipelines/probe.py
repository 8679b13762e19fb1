"""What is this model file? Decided from tensor names and shapes, never from the file name.

Users upload files called `final_v2_REAL.safetensors`; the name says nothing. The tensors say
everything: an LDM checkpoint has `model.diffusion_model.*`, a kohya LoRA `lora_unet_*`, an SDXL
checkpoint a second text encoder under `conditioner.embedders.1`, an inpainting UNet 9 input
channels. For safetensors only the header is read, so probing a 7 GB file takes milliseconds.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pipelines import safe_files
from pipelines.errors import ModelFormatError, UnknownModelTypeError
from pipelines.safe_files import FileKind

logger = logging.getLogger(__name__)

Shapes = Mapping[str, tuple[int, ...]]


class ModelType(StrEnum):
    CHECKPOINT = "checkpoint"
    LORA = "lora"
    TEXTUAL_INVERSION = "textual_inversion"
    HYPERNETWORK = "hypernetwork"
    VAE = "vae"
    CONTROLNET = "controlnet"


class Base(StrEnum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl_refiner"


@dataclass(frozen=True)
class Architecture:
    """The shape facts that pick a config skeleton; computed alike from LDM tensors and from configs."""

    unet_in_channels: int
    unet_channels: int  # conv_in output width (320 for SD1/SDXL, 384 for the refiner)
    context_dim: int  # cross-attention width: 768 SD1, 1024 SD2, 2048 SDXL, 1280 refiner
    adm_in_channels: int | None  # SDXL "text_time" embedding input (2816 base, 2560 refiner)
    transformer_blocks: int
    input_blocks: int
    text_widths: tuple[int | None, int | None]  # (text_encoder, text_encoder_2) hidden sizes
    vae_channels: int | None


@dataclass(frozen=True)
class ModelInfo:
    """The probe's verdict. `details` holds type-specific facts (see `probe` docs)."""

    type: ModelType
    base: Base | None
    format: FileKind
    inpaint: bool = False
    supported: bool = True
    problem: str | None = None
    architecture: Architecture | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))


_BASE_BY_CONTEXT = {768: Base.SD1, 1024: Base.SD2, 2048: Base.SDXL, 1280: Base.SDXL_REFINER}
_UNET = "model.diffusion_model."


def _first(shapes: Shapes, pattern: str) -> tuple[str, tuple[int, ...]] | None:
    regex = re.compile(pattern)
    for key in sorted(shapes):
        if regex.search(key):
            return key, shapes[key]
    return None


def _text_widths(shapes: Shapes) -> tuple[int | None, int | None]:
    """Hidden widths of (text_encoder, text_encoder_2) as diffusers names them."""
    def width(key: str) -> int | None:
        return shapes[key][1] if key in shapes else None

    te1 = (width("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
           or width("cond_stage_model.model.token_embedding.weight")
           or width("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"))
    te2 = width("conditioner.embedders.1.model.token_embedding.weight")
    if te2 is None and "conditioner.embedders.0.model.token_embedding.weight" in shapes:  # refiner
        te2 = width("conditioner.embedders.0.model.token_embedding.weight")
    return te1, te2


def checkpoint_architecture(shapes: Shapes) -> Architecture:
    """The Architecture of an LDM-layout checkpoint from its tensor shapes."""
    conv_in = shapes.get(_UNET + "input_blocks.0.0.weight")
    context = _first(shapes, r"^model\.diffusion_model\..*attn2\.to_k\.weight$")
    if conv_in is None or context is None:
        raise UnknownModelTypeError("checkpoint has no UNet (model.diffusion_model.input_blocks.0.0 / attn2 missing)")
    adm = shapes.get(_UNET + "label_emb.0.0.weight")
    input_ids = {int(m[1]) for k in shapes if (m := re.match(r"model\.diffusion_model\.input_blocks\.(\d+)\.", k))}
    vae = shapes.get("first_stage_model.encoder.conv_in.weight")
    return Architecture(
        unet_in_channels=conv_in[1], unet_channels=conv_in[0], context_dim=context[1][1],
        adm_in_channels=adm[1] if adm else None,
        transformer_blocks=sum(1 for k in shapes if k.startswith(_UNET) and k.endswith(".attn1.to_q.weight")),
        input_blocks=max(input_ids) + 1, text_widths=_text_widths(shapes),
        vae_channels=vae[0] if vae else None,
    )


def _checkpoint_base(shapes: Shapes, arch: Architecture) -> Base | None:
    if any(k.startswith("conditioner.embedders.1.model.") for k in shapes):
        return Base.SDXL
    if any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        return Base.SDXL_REFINER
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return Base.SD2
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return Base.SD1
    if arch.adm_in_channels is not None:
        return Base.SDXL_REFINER if arch.context_dim == 1280 else Base.SDXL
    return _BASE_BY_CONTEXT.get(arch.context_dim)


def _dominant_dtype(dtypes: Mapping[str, str]) -> str | None:
    counts: dict[str, int] = {}
    for dtype in dtypes.values():
        counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


def _probe_checkpoint(shapes: Shapes, fmt: FileKind, dtypes: Mapping[str, str]) -> ModelInfo:
    arch = checkpoint_architecture(shapes)
    base = _checkpoint_base(shapes, arch)
    components = ["unet"]
    if arch.vae_channels is not None:
        components.append("vae")
    components += [n for n, w in zip(("text_encoder", "text_encoder_2"), arch.text_widths, strict=True) if w]
    details = {
        "in_channels": arch.unet_in_channels, "context_dim": arch.context_dim, "components": tuple(components),
        "ema": any(k.startswith("model_ema.") for k in shapes), "tensors": len(shapes),
        "dtype": _dominant_dtype({k: v for k, v in dtypes.items() if k.startswith(_UNET)}),
    }
    problem = None
    if "vae" not in components or not any(arch.text_widths):
        problem = f"checkpoint lacks {'the VAE' if 'vae' not in components else 'text encoder'} weights"
    elif arch.unet_in_channels not in (4, 9):
        problem = f"UNet with {arch.unet_in_channels} input channels (depth/upscale models) is not supported"
    return ModelInfo(ModelType.CHECKPOINT, base, fmt, inpaint=arch.unet_in_channels == 9, supported=problem is None,
                     problem=problem, architecture=arch, details=details)


_LORA_MARKERS = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".lora.down.weight",
                 ".lora_linear_layer.down.weight")


def _lora_base(shapes: Shapes, metadata: Mapping[str, str]) -> Base | None:
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return Base.SDXL
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return Base.SD2
    if version.startswith("sd_v1"):
        return Base.SD1
    keys = list(shapes)
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys) or any("text_encoder_2." in k for k in keys):
        return Base.SDXL
    if any(k.startswith("lora_unet_") and ("input_blocks" in k or "output_blocks" in k) for k in keys):
        return Base.SDXL  # sd-scripts writes sgm module names only for SDXL
    cross = _first(shapes, r"attn2[._]to_k.*(lora_down|lora_A|lora\.down)\.weight$")
    if cross is not None and cross[1][1] in _BASE_BY_CONTEXT:
        return _BASE_BY_CONTEXT[cross[1][1]]
    te = _first(shapes, r"^lora_te_.*q_proj\.lora_down\.weight$")
    if te is not None:
        return Base.SD2 if te[1][1] == 1024 else Base.SD1
    return None


def _probe_lora(shapes: Shapes, fmt: FileKind, metadata: Mapping[str, str], alphas: list[float]) -> ModelInfo:
    keys = list(shapes)
    if any(".hada_w1_a" in k for k in keys) or any(".lokr_w1" in k for k in keys):
        network = "loha" if any(".hada_w1_a" in k for k in keys) else "lokr"
        return ModelInfo(ModelType.LORA, _lora_base(shapes, metadata), fmt, supported=False,
                         problem=f"{network.upper()} (LyCORIS) networks are not supported; use LoRA or LoCon",
                         details={"network": network})
    downs = {k: s for k, s in shapes.items() if k.endswith((".lora_down.weight", ".lora_A.weight",
                                                            ".lora.down.weight", ".lora_linear_layer.down.weight"))}
    ranks = sorted({s[0] for s in downs.values()})
    conv = any(len(s) == 4 and s[2] * s[3] > 1 for s in downs.values())
    text = any(k.startswith(("lora_te", "text_encoder")) or ".text_model." in k for k in keys)
    naming = "kohya" if any(k.startswith(("lora_unet_", "lora_te")) for k in keys) else "diffusers"
    details = {
        "network": "locon" if conv else "lora", "rank": max(ranks) if ranks else None, "ranks": tuple(ranks),
        "alpha": alphas[0] if len(set(alphas)) == 1 else None, "modules": len(downs), "naming": naming,
        "text_encoder": text, "unet": any(k.startswith(("lora_unet_", "unet.")) for k in keys),
        "dora": any("dora_scale" in k or "magnitude" in k for k in keys),
    }
    for key in ("ss_output_name", "ss_network_module", "ss_base_model_version"):
        if key in metadata:
            details[key] = metadata[key]
    return ModelInfo(ModelType.LORA, _lora_base(shapes, metadata), fmt, details=details)


def _embedding_info(widths: Mapping[str, tuple[int, ...]], fmt: FileKind, name: str | None = None) -> ModelInfo:
    if set(widths) == {"clip_l", "clip_g"}:
        base: Base | None = Base.SDXL
        details: dict[str, Any] = {"vectors": widths["clip_l"][0], "width": widths["clip_l"][-1],
                                   "width_2": widths["clip_g"][-1]}
    else:
        (shape,) = widths.values()
        vectors, width = (shape[0], shape[-1]) if len(shape) == 2 else (1, shape[-1])
        base = {768: Base.SD1, 1024: Base.SD2}.get(width)
        details = {"vectors": vectors, "width": width}
    if name:
        details["name"] = name
    return ModelInfo(ModelType.TEXTUAL_INVERSION, base, fmt, details=details)


def _is_embedding(shapes: Shapes) -> bool:
    if set(shapes) in ({"emb_params"}, {"clip_l", "clip_g"}):
        return True
    # diffusers' own format: {"<token>": tensor[n, width]} — one small tensor named by a token, not a module path
    if len(shapes) != 1:
        return False
    ((name, shape),) = shapes.items()
    return "." not in name and 1 <= len(shape) <= 2 and shape[0] <= 77


def _vae_info(shapes: Shapes, fmt: FileKind) -> ModelInfo:
    prefix = "first_stage_model." if "first_stage_model.encoder.conv_in.weight" in shapes else ""
    naming = "diffusers" if any(".down_blocks." in k for k in shapes) else "ldm"
    conv_out = shapes.get(prefix + "encoder.conv_out.weight")
    details = {"naming": naming, "channels": shapes[prefix + "encoder.conv_in.weight"][0],
               "latent_channels": conv_out[0] // 2 if conv_out else None, "prefixed": bool(prefix)}
    return ModelInfo(ModelType.VAE, None, fmt, details=details)


def _controlnet_info(shapes: Shapes, fmt: FileKind) -> ModelInfo:
    naming = "ldm" if any(k.startswith("control_model.") or k.startswith("input_hint_block.") for k in shapes) \
        else "diffusers"
    context = _first(shapes, r"attn2\.to_k\.weight$")
    has_add = any(k.endswith(("label_emb.0.0.weight", "add_embedding.linear_1.weight")) for k in shapes)
    base = Base.SDXL if has_add else _BASE_BY_CONTEXT.get(context[1][1]) if context else None
    hint = _first(shapes, r"(input_hint_block\.0|controlnet_cond_embedding\.conv_in)\.weight$")
    details = {"naming": naming, "context_dim": context[1][1] if context else None,
               "hint_channels": hint[1][1] if hint else None}
    return ModelInfo(ModelType.CONTROLNET, base, fmt, details=details)


def probe_tensors(
    shapes: Shapes, *, metadata: Mapping[str, str] | None = None, fmt: FileKind = FileKind.SAFETENSORS,
    dtypes: Mapping[str, str] | None = None, alphas: list[float] | None = None, source: str = "file",
) -> ModelInfo:
    """Classify a flat tensor mapping (names -> shapes). Pure: usable on headers and on meta models."""
    metadata = metadata or {}
    keys = list(shapes)
    if not keys:
        raise ModelFormatError(f"{source} contains no tensors")
    if any(k.endswith(_LORA_MARKERS) or ".hada_w1_a" in k or ".lokr_w1" in k for k in keys):
        return _probe_lora(shapes, fmt, metadata, alphas or [])
    if _is_embedding(shapes):
        return _embedding_info(shapes, fmt)
    if any(k.startswith(("control_model.", "input_hint_block.", "controlnet_cond_embedding.")) for k in keys):
        return _controlnet_info(shapes, fmt)
    if any(k.startswith(_UNET) for k in keys):
        return _probe_checkpoint(shapes, fmt, dtypes or {})
    if any(k.endswith("encoder.conv_in.weight") for k in keys) and any(k.endswith("decoder.conv_out.weight")
                                                                       for k in keys):
        return _vae_info(shapes, fmt)
    family = next((name for marker, name in (("double_blocks.", "Flux"), ("joint_blocks.", "Stable Diffusion 3"))
                   if any(marker in k for k in keys)), None)
    if family:
        raise UnknownModelTypeError(f"{source} is a {family} model, which this engine does not support")
    sample = ", ".join(sorted(keys)[:4])
    raise UnknownModelTypeError(f"{source}: tensors do not match any known model type (first keys: {sample})")


def _lora_alphas(header: safe_files.SafetensorsHeader) -> list[float]:
    """Read the scalar `.alpha` tensors (a few bytes each) straight from their offsets."""
    import struct

    formats = {"F32": "<f", "F16": "<e", "F64": "<d", "BF16": None}
    out: list[float] = []
    with header.path.open("rb") as f:
        for key, info in header.tensors.items():
            if not key.endswith(".alpha") or info.numel != 1:
                continue
            f.seek(header.data_offset + info.start)
            raw = f.read(info.end - info.start)
            fmt = formats.get(info.dtype)
            if info.dtype == "BF16":
                out.append(struct.unpack("<f", b"\x00\x00" + raw)[0])
            elif fmt:
                out.append(struct.unpack(fmt, raw)[0])
    return out


def _probe_pickle(path: Path, kind: FileKind) -> ModelInfo:
    import torch

    obj = safe_files.load_pickle(path)
    if isinstance(obj, dict) and "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelFormatError(f"{path.name}: string_to_param must hold exactly one embedding")
        (tensor,) = params.values()
        return _embedding_info({"*": tuple(tensor.shape)}, kind, name=obj.get("name"))
    dims = sorted(k for k in obj if isinstance(k, int)) if isinstance(obj, dict) else []
    if dims and all(isinstance(obj[d], list | tuple) and len(obj[d]) == 2 for d in dims):
        # A1111 hypernetwork: {context width: (k module state, v module state)}; old files lack the options
        base = Base.SD2 if 1024 in dims else Base.SD1 if 768 in dims else None
        details = {"dims": tuple(dims), "layer_structure": tuple(obj.get("layer_structure") or ()),
                   "activation": obj.get("activation_func"), "layer_norm": bool(obj.get("is_layer_norm")),
                   "name": obj.get("name")}
        return ModelInfo(ModelType.HYPERNETWORK, base, kind, details=details)
    tensors = safe_files.tensors_of(obj, source=path.name)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    dtype_names = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}
    dtypes = {k: dtype_names.get(v.dtype, str(v.dtype)) for k, v in tensors.items()}
    alphas = [float(v) for k, v in tensors.items() if k.endswith(".alpha") and v.numel() == 1]
    return probe_tensors(shapes, fmt=kind, dtypes=dtypes, alphas=alphas, source=path.name)


def _probe_folder(path: Path) -> ModelInfo:
    if (path / "model_index.json").is_file():
        from pipelines.skeletons import architecture_from_folder

        index = json.loads((path / "model_index.json").read_text())
        arch = architecture_from_folder(path)
        te1, te2 = arch.text_widths
        base = (Base.SDXL if te1 and te2 else Base.SDXL_REFINER if te2 else
                Base.SD2 if arch.context_dim == 1024 else Base.SD1)
        details = {"pipeline": index.get("_class_name"), "in_channels": arch.unet_in_channels,
                   "context_dim": arch.context_dim}
        return ModelInfo(ModelType.CHECKPOINT, base, FileKind.DIFFUSERS, inpaint=arch.unet_in_channels == 9,
                         architecture=arch, details=details)
    config = json.loads((path / "config.json").read_text())
    kinds = {"ControlNetModel": ModelType.CONTROLNET, "AutoencoderKL": ModelType.VAE}
    model_type = kinds.get(config.get("_class_name"))
    if model_type is None:
        raise UnknownModelTypeError(f"{path.name}: diffusers folder of {config.get('_class_name')!r} is not a model "
                                    "type we load")
    base = None
    if model_type is ModelType.CONTROLNET:
        base = Base.SDXL if config.get("addition_embed_type") else _BASE_BY_CONTEXT.get(config.get("cross_attention_dim"))
    return ModelInfo(model_type, base, FileKind.DIFFUSERS, details={"class": config.get("_class_name")})


def probe(path: Path) -> ModelInfo:
    """Classify a model file or diffusers folder.

    `details` by type — checkpoint: in_channels, context_dim, components, ema, dtype, tensors;
    LoRA: network (lora/locon/loha/lokr), rank, ranks, alpha, modules, naming, text_encoder, unet,
    dora, ss_* fields; textual inversion: vectors, width (width_2 for SDXL), name; hypernetwork:
    dims, layer_structure, activation, layer_norm, name; VAE: naming, channels, latent_channels;
    ControlNet: naming, context_dim, hint_channels.
    """
    path = Path(path)
    kind = safe_files.detect_kind(path)
    if kind is FileKind.DIFFUSERS:
        return _probe_folder(path)
    if kind is FileKind.SAFETENSORS:
        header = safe_files.read_safetensors_header(path)
        dtypes = {k: t.dtype for k, t in header.tensors.items()}
        alphas = _lora_alphas(header) if any(k.endswith(".alpha") for k in header.tensors) else []
        return probe_tensors(header.shapes(), metadata=header.metadata, fmt=kind, dtypes=dtypes, alphas=alphas,
                             source=path.name)
    return _probe_pickle(path, kind)
