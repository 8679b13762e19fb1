"""Tiny skeletons and single-file checkpoints for tests, in the same formats production uses.

`write_tiny_skeletons` writes skeletons for the tiny pipelines with `pipelines.skeletons.write_skeleton`
— the format of assets/skeletons — so the product loader finds them by architecture exactly as it
finds the real ones. `write_single_file` writes an A1111/LDM checkpoint of a tiny pipeline.

`tiny_files()` is a process-wide, lazily filled store of those artefacts (in one temp dir removed at
exit) so that many test modules share one build. Treat its pipelines as read-only; build your own
with `build_pipeline` to mutate one.
"""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from tests.tiny import ldm
from tests.tiny.models import tiny_sd15, tiny_sdxl

KINDS = ("sd15", "sd15_inpaint", "sdxl", "sdxl_inpaint", "sdxl_refiner")
Kind = Literal["sd15", "sd15_inpaint", "sdxl", "sdxl_inpaint", "sdxl_refiner"]


def _tiny_sdxl_inpaint(tokenizer_dir: Path, seed: int) -> Any:
    """The tiny SDXL with a 9-channel UNet (SDXL inpainting checkpoints)."""
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    base = tiny_sdxl(tokenizer_dir, seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = StableDiffusionXLInpaintPipeline(**(components | {"unet": unet}), requires_aesthetics_score=False,
                                            force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(kind: Kind, tokenizer_dir: Path, seed: int = 0) -> Any:
    """A fresh tiny pipeline of `kind` (deterministic by seed), in eval mode like a loaded one."""
    if kind == "sd15":
        pipe = tiny_sd15(tokenizer_dir, seed=seed)
    elif kind == "sd15_inpaint":
        pipe = tiny_sd15(tokenizer_dir, seed=seed, in_channels=9)
    elif kind == "sdxl":
        pipe = tiny_sdxl(tokenizer_dir, seed=seed)
    elif kind == "sdxl_inpaint":
        pipe = _tiny_sdxl_inpaint(tokenizer_dir, seed)
    elif kind == "sdxl_refiner":
        pipe = tiny_sdxl(tokenizer_dir, seed=seed, refiner=True)
    else:
        raise ValueError(f"unknown tiny kind {kind!r}; choose from {KINDS}")
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def write_tiny_skeletons(root: Path, tokenizer_dir: Path, kinds: tuple[str, ...] = KINDS) -> Path:
    """Write `tiny-<kind>` skeletons for the tiny pipelines under `root` (one shared vocabulary)."""
    from pipelines.skeletons import write_skeleton

    for kind in kinds:
        write_skeleton(build_pipeline(kind, tokenizer_dir), root, f"tiny-{kind.replace('_', '-')}",
                       vocabulary="tiny-bytes", overwrite=True)
    return root


def write_single_file(
    pipe: Any, path: Path, *, dtype: torch.dtype = torch.float32, extras: bool = False,
    fmt: Literal["safetensors", "ckpt"] = "safetensors",
) -> Path:
    """Write `pipe` as an A1111/LDM single-file checkpoint."""
    return ldm.write_checkpoint(path, pipe, dtype=dtype, extras=extras, fmt=fmt)


class TinyFiles:
    """Tiny pipelines, skeletons and files under one directory, each built on first use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tokenizer_dir = self.root / "tokenizer"
        self._files: dict[tuple, Path] = {}
        self._pipes: dict[str, Any] = {}

    def pipeline(self, kind: Kind) -> Any:
        """The shared reference pipeline of `kind` (seed 0). Do not mutate it."""
        if kind not in self._pipes:
            self._pipes[kind] = build_pipeline(kind, self.tokenizer_dir)
        return self._pipes[kind]

    @cached_property
    def skeleton_root(self) -> Path:
        return write_tiny_skeletons(self.root / "skeletons", self.tokenizer_dir)

    def checkpoint(self, kind: Kind, *, dtype: torch.dtype = torch.float32, extras: bool = False,
                   fmt: Literal["safetensors", "ckpt"] = "safetensors") -> Path:
        """An LDM single file of `pipeline(kind)`; cached by arguments."""
        key = ("checkpoint", kind, str(dtype), extras, fmt)
        if key not in self._files:
            suffix = "safetensors" if fmt == "safetensors" else "ckpt"
            name = f"{kind}-{str(dtype).split('.')[-1]}{'-extras' if extras else ''}.{suffix}"
            self._files[key] = write_single_file(self.pipeline(kind), self.root / "files" / name, dtype=dtype,
                                                 extras=extras, fmt=fmt)
        return self._files[key]

    def diffusers_folder(self, kind: Kind) -> Path:
        key = ("folder", kind)
        if key not in self._files:
            target = self.root / "folders" / kind
            self.pipeline(kind).save_pretrained(target)
            self._files[key] = target
        return self._files[key]


_STORE: list[TinyFiles] = []


def tiny_files() -> TinyFiles:
    """The process-wide TinyFiles (created on first call; its directory is deleted at exit)."""
    if not _STORE:
        root = Path(tempfile.mkdtemp(prefix="studio-tiny-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _STORE.append(TinyFiles(root))
    return _STORE[0]


def meta_components(skeleton_dir: Path) -> SimpleNamespace:
    """The skeleton's models instantiated on the meta device (shapes, no memory): unet, vae, text encoders."""
    import json

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    index = json.loads((skeleton_dir / "model_index.json").read_text())
    parts: dict[str, Any] = {"text_encoder": None, "text_encoder_2": None}
    with init_empty_weights():
        parts["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(skeleton_dir / "unet"))
        parts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(skeleton_dir / "vae"))
        for name in ("text_encoder", "text_encoder_2"):
            library, cls = index.get(name) or [None, None]
            if library is None:
                continue
            config = CLIPTextConfig.from_pretrained(skeleton_dir / name)
            parts[name] = (CLIPTextModelWithProjection if cls == "CLIPTextModelWithProjection" else CLIPTextModel)(config)
    return SimpleNamespace(**parts)


def ldm_layout(skeleton_dir: Path, dtype: torch.dtype = torch.float16) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names and shapes of a full LDM checkpoint for the skeleton (what a real single file holds)."""
    return {k: (tuple(v.shape), dtype) for k, v in ldm.pipeline_to_ldm(meta_components(skeleton_dir)).items()}


def write_random_ldm(skeleton_dir: Path, path: Path, *, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """A full-size random-weight LDM checkpoint for `skeleton_dir`, written one tensor at a time.

    Norm scales are 1 and biases 0, other weights N(0, 1/fan_in), so activations stay finite through a
    real-size network and a generated image is a meaningful smoke test.
    """
    layout = ldm_layout(skeleton_dir, dtype)
    # One pool of normals per fan-in, already scaled and cast, sliced at a different offset per tensor:
    # drawing and converting 1e9 fresh values costs far more than the smoke test needs.
    base = torch.randn(1 << 22, generator=torch.Generator().manual_seed(seed))
    pools: dict[int, torch.Tensor] = {}
    names = {name: i for i, name in enumerate(layout)}

    def make(name: str) -> torch.Tensor:
        shape, _ = layout[name]
        if len(shape) == 1:
            return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        fan_in = math.prod(shape[1:])
        if fan_in not in pools:
            pools[fan_in] = (base / fan_in**0.5).to(dtype)
        pool, count = pools[fan_in], math.prod(shape)
        if count > pool.numel():
            return pool.repeat(-(-count // pool.numel()))[:count].reshape(shape)
        start = (names[name] * 7_919_993) % (pool.numel() - count + 1)
        return pool[start:start + count].reshape(shape)

    return ldm.save_streaming(path, layout, make)
