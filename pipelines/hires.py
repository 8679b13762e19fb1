"""Hires fix (txt2img second pass) with A1111 semantics.

The first pass runs at width×height; its result is upscaled either in latent space (A1111's "Latent*"
modes: torch interpolation of the latents) or as an image (Lanczos/Nearest; "None" resizes with
Lanczos as A1111's resize does), then denoised again as img2img at ``denoising_strength``.
A1111 runs exactly ``hr_second_pass_steps`` (or ``steps``) denoising steps in that pass, so the
scheduler is asked for ``steps / denoising_strength`` steps of which the last ``steps`` run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch convention
from PIL import Image

from pipelines.types import LATENT_UPSCALERS, GenerationRequest

_LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
_IMAGE_MODES = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST,
                "None": Image.Resampling.LANCZOS}


def is_latent(upscaler: str) -> bool:
    return upscaler in LATENT_UPSCALERS


def upscale_latents(latents: torch.Tensor, width: int, height: int, upscaler: str, factor: int = 8) -> torch.Tensor:
    mode, antialias = _LATENT_MODES[upscaler]
    size = (height // factor, width // factor)
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    if antialias:
        kwargs["antialias"] = True
    return F.interpolate(latents.float(), size=size, mode=mode, **kwargs).to(latents.dtype)


def upscale_images(images: list[Image.Image], width: int, height: int, upscaler: str) -> list[Image.Image]:
    resample = _IMAGE_MODES[upscaler]
    return [img.resize((width, height), resample) for img in images]


def second_pass_steps(request: GenerationRequest) -> tuple[int, int]:
    """(steps to give the scheduler, steps that actually run) for the hires pass.

    diffusers runs ``int(n * strength)`` of ``n`` steps; pick the smallest ``n`` giving the wanted count.
    """
    wanted = request.hr_second_pass_steps or request.steps
    strength = request.denoising_strength
    n = wanted
    while int(n * strength) < wanted:
        n += 1
    return n, wanted
