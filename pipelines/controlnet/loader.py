"""ControlNet model files into diffusers `ControlNetModel`s, air-gapped.

Three layouts reach us, told apart by their tensors (pipelines.probe), never by their names:

* LDM single files — lllyasviel's SD1.5 releases and most Civitai files: `control_model.*` keys, or
  the same keys without the prefix (`input_hint_block.*`, `zero_convs.*`), .safetensors or a safe
  .pth/.ckpt. Renamed with diffusers' own converter; SDXL files in this layout get the `label_emb`
  → `add_embedding` renaming the converter leaves out, so they load too.
* diffusers-layout single files (how SDXL ControlNets are usually shared) — loaded as they are.
* diffusers folders (config.json + diffusion_pytorch_model.safetensors) — their own config; and
  such folders packed on import into one file (pipelines.controlnet.folders), whose metadata carries
  the folder's config, which is used as the folder's would be.

A single file holds weights only. Its config is the shipped skeleton of its family
(assets/skeletons/controlnet-sd15, controlnet-sdxl: the published configs) with every value the
tensors can tell — widths, blocks, transformer depths, hint encoder channels, context width —
taken from the tensors instead. So ControlNets of other sizes (SDXL "mid"/"small", and the tiny
ones tests build) load through the same code as the real ones, and what cannot be read from shapes
(head counts, GroupNorm groups, time-embedding width) is the family's. The file must then fill that
model exactly: a missing, extra or misshapen tensor is an error naming it, never a half-loaded model.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import loader as _checkpoint_loader  # noqa: F401  (installs its diffusers log filter)
from pipelines import safe_files
from pipelines.controlnet import folders
from pipelines.errors import IncompatibleModelError, ModelFormatError
from pipelines.probe import Base, ModelInfo, ModelType, probe
from pipelines.safe_files import FileKind
from pipelines.skeletons import SHIPPED_ROOT

if TYPE_CHECKING:
    import torch
    from diffusers import ControlNetModel

logger = logging.getLogger(__name__)

SKELETONS = {"sd15": "controlnet-sd15", "sdxl": "controlnet-sdxl"}
"""Config skeleton (a folder under assets/skeletons) per ControlNet family."""

_LDM_PREFIX = "control_model."
_LABEL_EMB = {"label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2."}
_BASE_LABELS = {Base.SD1: "SD1.x", Base.SD2: "SD2.x", Base.SDXL: "SDXL", Base.SDXL_REFINER: "the SDXL refiner"}


class ControlNetLayout(StrEnum):
    LDM = "ldm"
    DIFFUSERS_FILE = "diffusers_file"
    DIFFUSERS_FOLDER = "diffusers_folder"


class BaseMismatch(IncompatibleModelError):
    """A ControlNet unit made for another base model than the job's checkpoint."""

    @classmethod
    def for_unit(cls, unit: int, name: str, controlnet_base: Base | str | None,
                 checkpoint_base: Base | str | None) -> BaseMismatch:
        return cls(f"ControlNet unit {unit} ({name}) is for {base_label(controlnet_base)} but the checkpoint is "
                   f"{base_label(checkpoint_base)}; choose a ControlNet made for {base_label(checkpoint_base)}")


def base_label(base: Base | str | None) -> str:
    """A base as people say it; accepts probe bases and the records' strings ("sd1-inpaint", "sdxl")."""
    if isinstance(base, str) and not isinstance(base, Base):
        try:
            base = Base(base.removesuffix("-inpaint").replace("-", "_"))
        except ValueError:
            return base
    return _BASE_LABELS.get(base, "an unknown base") if base is not None else "an unknown base"


@dataclass(frozen=True)
class ControlNetInfo:
    """What a ControlNet file is, read from its header or config (no weights loaded).

    `config` is the diffusers config it will be built with; `family` names its skeleton (None: none fits).
    """

    base: Base | None
    layout: ControlNetLayout
    family: str | None
    config: Mapping[str, Any]

    @property
    def context_dim(self) -> int:
        return int(self.config["cross_attention_dim"])

    @property
    def conditioning_channels(self) -> int:
        return int(self.config["conditioning_channels"])

    def check_fits(self, unet_config: Mapping[str, Any], *, unit: int, name: str,
                   checkpoint_base: Base | str | None = None) -> None:
        """Refuse (BaseMismatch naming the unit) a ControlNet whose residuals cannot feed this UNet.

        Compared by structure, not labels: the context width, the text_time embedding and the down-block
        widths must be the UNet's, which is exactly what adding the ControlNet's residuals needs.
        """
        text_time = unet_config.get("addition_embed_type") == "text_time"
        fits = (self.context_dim == unet_config.get("cross_attention_dim")
                and (self.config.get("addition_embed_type") == "text_time") == text_time
                and list(self.config["block_out_channels"]) == list(unet_config.get("block_out_channels") or [])
                and self.config["layers_per_block"] == unet_config.get("layers_per_block"))
        if not fits:
            raise BaseMismatch.for_unit(unit, name, self.base, checkpoint_base)


def own_tensors(keys: Iterable[str]) -> list[str]:
    """The tensors that are the ControlNet: original v1.0 releases carry a whole SD model beside
    `control_model.*`, which the loader never reads and an import need not store."""
    keys = list(keys)
    prefixed = [k for k in keys if k.startswith(_LDM_PREFIX)]
    return prefixed or keys


def _indices(keys: list[str], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := regex.match(k))})


def _ldm_to_diffusers(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename an LDM ControlNet (prefixed or bare) to diffusers keys; values are passed through untouched,
    so this works on tensors and on shapes alike."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if any(k.startswith(_LDM_PREFIX) for k in state):  # v1.0 files also carry a whole SD model: keep the ControlNet
        state = {k.removeprefix(_LDM_PREFIX): v for k, v in state.items() if k.startswith(_LDM_PREFIX)}
    keys = list(state)
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    downsamplers = _indices(keys, r"input_blocks\.(\d+)\.0\.op\.weight$")
    if not blocks or "input_hint_block.14.weight" not in state:
        raise ModelFormatError("ControlNet in LDM layout lacks input_blocks or the hint encoder's last "
                               "convolution (input_hint_block.14)")
    n_blocks = len(downsamplers) + 1
    layers, rest = divmod(len(blocks) - 1 - len(downsamplers), n_blocks)
    if rest:
        raise ModelFormatError(f"ControlNet in LDM layout has {len(blocks)} input blocks, which no block layout "
                               f"with {n_blocks} levels gives")
    out = {k: v for k, v in convert_controlnet_checkpoint(state, {"layers_per_block": layers}).items()
           if v is not None}
    for key, value in state.items():  # SDXL text_time embedding: the converter does not map it
        for old, new in _LABEL_EMB.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
    return out


def _family(base: Base | None, has_text_time: bool, context_dim: int | None) -> str | None:
    if base is Base.SDXL or (base is None and has_text_time):
        return "sdxl"
    if base is Base.SD1 or (base is None and not has_text_time and context_dim != 1024):
        return "sd15"
    return None


def skeleton_config(family: str) -> dict[str, Any]:
    path = SHIPPED_ROOT / SKELETONS[family] / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"cannot read the ControlNet config skeleton {path}: {exc}") from exc


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], skeleton: Mapping[str, Any]) -> dict[str, Any]:
    """The skeleton's config with everything the (diffusers-named) tensor shapes determine taken from them."""
    keys = list(shapes)
    levels = _indices(keys, r"down_blocks\.(\d+)\.")
    if not levels or "conv_in.weight" not in shapes or "controlnet_cond_embedding.conv_in.weight" not in shapes:
        raise ModelFormatError("ControlNet tensors lack conv_in, down_blocks or controlnet_cond_embedding")
    widths = [shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in levels]
    attention = [bool(_indices(keys, rf"down_blocks\.{i}\.attentions\.(\d+)\.")) for i in levels]
    depths = [len(_indices(keys, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")) if a else 1
              for i, a in zip(levels, attention, strict=True)]
    hint_blocks = _indices(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$")
    hint = [shapes["controlnet_cond_embedding.conv_in.weight"][0]]
    hint += [shapes[f"controlnet_cond_embedding.blocks.{j}.weight"][0] for j in hint_blocks if j % 2]
    config = dict(skeleton)
    config.update(
        in_channels=shapes["conv_in.weight"][1], block_out_channels=widths,
        layers_per_block=len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\.")),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths,
        conditioning_channels=shapes["controlnet_cond_embedding.conv_in.weight"][1],
        conditioning_embedding_out_channels=hint,
        mid_block_type="UNetMidBlock2DCrossAttn" if any(k.startswith("mid_block.attentions.") for k in keys)
        else "UNetMidBlock2D",
    )
    to_k = next((shapes[k] for k in sorted(keys) if k.endswith("attn2.to_k.weight")), None)
    if to_k is not None:
        config["cross_attention_dim"] = to_k[1]
    proj_in = next((shapes[k] for k in sorted(keys) if k.endswith("proj_in.weight")), None)
    if proj_in is not None:
        config["use_linear_projection"] = len(proj_in) == 2
    heads = skeleton.get("attention_head_dim")
    if isinstance(heads, list):  # per level: the family's head width (SDXL: 64 channels per head)
        head_width = skeleton["block_out_channels"][-1] // heads[-1]
        config["attention_head_dim"] = [max(1, w // head_width) for w in widths]
    add = shapes.get("add_embedding.linear_1.weight")
    if add is None:
        config.update(addition_embed_type=None, addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
    else:
        time_dim = config.get("addition_time_embed_dim")
        if not time_dim or add[1] <= 6 * time_dim:  # six time ids of time_dim each, then the pooled text embedding
            raise IncompatibleModelError(f"ControlNet text_time embedding takes {add[1]} inputs, which does not fit "
                                         f"six time ids of width {time_dim}")
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=add[1])
    return config


def _header(path: Path, kind: FileKind) -> tuple[dict[str, tuple[int, ...]], Mapping[str, str]]:
    """Tensor shapes and safetensors metadata (pickles have none)."""
    if kind is FileKind.SAFETENSORS:
        header = safe_files.read_safetensors_header(path)
        return header.shapes(), header.metadata
    return {k: tuple(v.shape) for k, v in safe_files.load_state_dict(path).items()}, {}


def _layout(info: ModelInfo) -> ControlNetLayout:
    if info.format is FileKind.DIFFUSERS:
        return ControlNetLayout.DIFFUSERS_FOLDER
    return ControlNetLayout.LDM if info.details.get("naming") == "ldm" else ControlNetLayout.DIFFUSERS_FILE


def _require_controlnet(path: Path, info: ModelInfo) -> None:
    if info.type is not ModelType.CONTROLNET:
        raise IncompatibleModelError(f"{path.name} is a {info.type.value.replace('_', ' ')}, not a ControlNet")


def _own_config(info: ModelInfo, layout: ControlNetLayout, config: Mapping[str, Any]) -> ControlNetInfo:
    text_time = config.get("addition_embed_type") == "text_time"
    return ControlNetInfo(info.base, layout, _family(info.base, text_time, config.get("cross_attention_dim")), config)


def _info_from(path: Path, info: ModelInfo, shapes: Mapping[str, tuple[int, ...]] | None,
               metadata: Mapping[str, str] | None = None) -> ControlNetInfo:
    layout = _layout(info)
    if layout is ControlNetLayout.DIFFUSERS_FOLDER:
        return _own_config(info, layout, folders.read_config(path))
    assert shapes is not None
    embedded = folders.embedded_config(metadata or {}, path.name) if layout is ControlNetLayout.DIFFUSERS_FILE else None
    if embedded is not None:  # a packed folder: its own config, as the folder would load
        return _own_config(info, layout, embedded)
    if layout is ControlNetLayout.LDM:
        shapes = _ldm_to_diffusers(shapes)
    text_time = "add_embedding.linear_1.weight" in shapes
    family = _family(info.base, text_time, info.details.get("context_dim"))
    if family is None:
        raise IncompatibleModelError(f"{path.name} is a ControlNet for {base_label(info.base)}; this studio has "
                                     f"ControlNet configs for {', '.join(sorted(SKELETONS))} only")
    return ControlNetInfo(info.base, layout, family, config_from_shapes(shapes, skeleton_config(family)))


def controlnet_info(path: Path | str, *, info: ModelInfo | None = None) -> ControlNetInfo:
    """Base, layout and config of a ControlNet file or folder, from its header (weights are not loaded)."""
    path = Path(path)
    info = info or probe(path)
    _require_controlnet(path, info)
    if info.format is FileKind.DIFFUSERS:
        return _info_from(path, info, None)
    return _info_from(path, info, *_header(path, info.format))


def _fill(model: ControlNetModel, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Load `state` into the meta-device `model`, refusing anything but an exact fit."""
    problem = folders.misfit({k: tuple(v.shape) for k, v in model.state_dict().items()},
                             {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise IncompatibleModelError(f"{name} does not fill a ControlNet of its own layout: {problem}")
    model.load_state_dict(dict(state), strict=True, assign=True)


def _load_folder(path: Path, dtype: torch.dtype) -> ControlNetModel:
    from diffusers import ControlNetModel

    variant = "fp16" if folders.weights_file(path).name.endswith(".fp16.safetensors") else None
    return ControlNetModel.from_pretrained(str(path), torch_dtype=dtype, variant=variant, use_safetensors=True,
                                           local_files_only=True)


def load_controlnet(
    path: Path | str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    info: ModelInfo | None = None,
) -> ControlNetModel:
    """Load a ControlNet file or diffusers folder on `device` in `dtype` (eval mode).

    Uncached: jobs go through `PipelineCache.controlnet(path, sha256)`, which calls this. `info` skips
    a second probe when the caller has one.
    """
    import torch
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    path = Path(path)
    dtype = dtype or torch.float32
    started = time.perf_counter()
    info = info or probe(path)
    _require_controlnet(path, info)
    if info.format is FileKind.DIFFUSERS:
        model = _load_folder(path, dtype)
    else:
        state = safe_files.load_state_dict(path)
        metadata = safe_files.read_safetensors_header(path).metadata if info.format is FileKind.SAFETENSORS else {}
        cn_info = _info_from(path, info, {k: tuple(v.shape) for k, v in state.items()}, metadata)
        if cn_info.layout is ControlNetLayout.LDM:
            state = _ldm_to_diffusers(state)
        try:
            with init_empty_weights():
                model = ControlNetModel.from_config(dict(cn_info.config))
        except (ValueError, TypeError) as exc:
            raise IncompatibleModelError(f"{path.name}: no {cn_info.family or 'diffusers'} ControlNet has this "
                                         f"layout ({exc})") from exc
        _fill(model, state, path.name)
        del state
    model = model.to(device=device, dtype=dtype).eval()
    logger.info("ControlNet %s (%s) ready on %s (%s) in %.2fs", path.name, _layout(info).value, device, dtype,
                time.perf_counter() - started)
    return model
