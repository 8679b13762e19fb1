"""Inpainting preparation and finishing with A1111 semantics.

* the mask (white = repaint) is optionally inverted and Gaussian-blurred separately in x and y;
* "Only masked" crops the blurred mask's bounding box plus padding, grown to the output aspect ratio,
  processes the crop at the full requested size and pastes the result back into the original image;
* masked content 0 ("fill") pre-fills the hole with colours spread in from its surroundings,
  2/3 ("latent noise"/"latent nothing") replace the hole in latent space (``latent_fill``);
* finally the untouched image is composited over the result through the blurred mask, so pixels
  outside the mask come back exactly as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from pipelines.images import LANCZOS, resize_image
from pipelines.types import GenerationRequest

logger = logging.getLogger(__name__)


@dataclass
class InpaintJob:
    """Inputs for the model plus what is needed to put the result back."""

    images: list[Image.Image]  # what the model sees, width × height
    mask: Image.Image  # blurred mask for the model, width × height
    originals: list[Image.Image]  # the images the result is composited onto (output size)
    overlay_mask: Image.Image  # blurred mask at output size
    paste_box: tuple[int, int, int, int] | None  # (x1, y1, x2, y2) in the original for "Only masked"
    note: str | None = None


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """Gaussian blur with separate x/y sigmas (A1111 uses σ = blur, kernel ±2.5σ)."""
    if blur_x <= 0 and blur_y <= 0:
        return mask
    from scipy.ndimage import gaussian_filter

    arr = np.asarray(mask, dtype=np.float32)
    out = gaussian_filter(arr, sigma=(max(blur_y, 0), max(blur_x, 0)), truncate=2.5, mode="nearest")
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "L")


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """Bounding box of the non-zero mask plus padding, clamped to the image; None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_to_aspect(box: tuple[int, int, int, int], width: int, height: int,
                     image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """Grow ``box`` symmetrically to the width:height aspect ratio, shifting/clamping inside the image."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    target = width / height
    if bw / bh < target:
        new_w = min(round(bh * target), image_w)
        x1, x2 = _grow(x1, x2, new_w, image_w)
    elif bw / bh > target:
        new_h = min(round(bw / target), image_h)
        y1, y2 = _grow(y1, y2, new_h, image_h)
    return x1, y1, x2, y2


def _grow(a: int, b: int, size: int, limit: int) -> tuple[int, int]:
    extra = size - (b - a)
    a -= extra // 2
    b += extra - extra // 2
    if a < 0:
        b, a = b - a, 0
    if b > limit:
        a, b = max(a - (b - limit), 0), limit
    return a, b


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill": spread the known colours into the hole, coarse to fine.

    Normalised averaging at decreasing scales (known pixels weighted by 1, hole by 0; each level is
    a box-downscale then bilinear upscale), finer levels overriding where they have data; known pixels
    are kept as they are.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    known = (np.asarray(mask.convert("L"), dtype=np.float32) < 128).astype(np.float32)
    if known.min() == 1.0 or known.max() == 0.0:
        return image.convert("RGB")
    h, w = known.shape
    result = np.zeros_like(rgb)
    for factor in (64, 16, 4, 1):
        sw, sh = max(1, w // factor), max(1, h // factor)
        weights = _rescale(known, sw, sh, w, h)
        colours = np.stack([_rescale(rgb[..., c] * known, sw, sh, w, h) for c in range(3)], axis=-1)
        ok = weights > 1e-3
        result[ok] = colours[ok] / weights[ok][:, None]
    result = np.where(known[..., None] > 0, rgb, result)
    return Image.fromarray(np.clip(result + 0.5, 0, 255).astype(np.uint8), "RGB")


def _rescale(channel: np.ndarray, sw: int, sh: int, w: int, h: int) -> np.ndarray:
    small = Image.fromarray(channel, "F").resize((sw, sh), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def prepare(request: GenerationRequest, images: list[Image.Image], mask: Image.Image) -> InpaintJob:
    """Build the model inputs for an inpaint job (mask already decoded to "L", same size as the images)."""
    if request.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blurred = blur_mask(mask, request.mask_blur_x, request.mask_blur_y)
    w, h = request.width, request.height
    if request.inpaint_full_res:
        box = crop_region(blurred, request.inpaint_full_res_padding)
        if box is not None:
            box = expand_to_aspect(box, w, h, mask.width, mask.height)
            crops = [img.crop(box).resize((w, h), LANCZOS) for img in images]
            model_mask = blurred.crop(box).resize((w, h), Image.Resampling.BILINEAR)
            if request.inpainting_fill == 0:
                crops = [fill_masked(c, model_mask) for c in crops]
            return InpaintJob(crops, model_mask, [img.copy() for img in images], blurred, box)
        note = 'Unable to perform "Only masked" because the mask is blank; processed the whole picture'
    else:
        note = None
    mode = 0 if request.resize_mode == 3 else request.resize_mode
    resized = [resize_image(mode, img, w, h) for img in images]
    model_mask = resize_image(mode, blurred, w, h, Image.Resampling.BILINEAR)
    model_images = [fill_masked(r, model_mask) for r in resized] if request.inpainting_fill == 0 else resized
    return InpaintJob(model_images, model_mask, resized, model_mask, None, note)


def finish(job: InpaintJob, generated: Image.Image, index: int) -> Image.Image:
    """Paste a generated image back (only-masked) and composite the original over it through the mask."""
    original = job.originals[index % len(job.originals)].convert("RGB")
    if job.paste_box is not None:
        x1, y1, x2, y2 = job.paste_box
        base = original.copy()
        base.paste(generated.convert("RGB").resize((x2 - x1, y2 - y1), LANCZOS), (x1, y1))
    else:
        base = generated.convert("RGB")
    return Image.composite(base, original, job.overlay_mask)


def latent_mask(mask: Image.Image, latent_w: int, latent_h: int) -> torch.Tensor:
    """The mask at latent resolution, rounded to 0/1 (A1111 ``mask_round``): 1 = repaint."""
    small = mask.convert("L").resize((latent_w, latent_h), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.round(np.asarray(small, dtype=np.float32) / 255.0))


def latent_fill(fill: int, mask: torch.Tensor, noise: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Masked content 2 (latent noise) / 3 (latent nothing): replace the hole of the init latents."""
    if fill not in (2, 3):
        return None

    def apply(latents: torch.Tensor) -> torch.Tensor:
        m = mask.to(device=latents.device, dtype=latents.dtype)[None, None]
        if fill == 3:
            return latents * (1 - m)
        return latents * (1 - m) + noise.to(device=latents.device, dtype=latents.dtype) * m

    return apply
