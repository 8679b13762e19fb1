"""What a job's first pass starts from, by request mode: text, init images, or init images with a mask.

Each mode is one ``Source`` class, registered in ``_SOURCES``: it decodes and prepares the request's
images once per job, gives every batch the typed inputs of its first pass, answers denoising strength 0
(nothing repainted) and finishes the generated images (inpaint composites them back). The job runs
every mode through the same steps instead of branching on ``request.mode``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from PIL import Image

from pipelines import hires, inpaint
from pipelines.images import decode_image, resize_image
from pipelines.passes import InitImage, InpaintMask
from pipelines.sampling import expand_for_batch
from pipelines.types import GenerationRequest, InvalidRequestError

# VAE-encodes PIL images at their own size to scaled latents (the job owns the pipeline and its VAE).
LatentEncoder = Callable[[list[Image.Image]], torch.Tensor]


class Source(ABC):
    """The prepared inputs of one job's first pass."""

    # Only a pass that starts from text is followed by the SDXL refiner and the hires fix.
    starts_from_text: ClassVar[bool] = False

    def __init__(self, request: GenerationRequest, factor: int) -> None:
        self.request = request
        self.factor = factor

    @abstractmethod
    def first_pass(self, batch: int, noise: torch.Tensor, encode: LatentEncoder,
                   inpainting_model: bool) -> tuple[InitImage | None, InpaintMask | None]:
        """The init and mask of one batch's first pass (``noise`` is the batch's initial noise)."""

    def unchanged(self, batch: int) -> list[Image.Image] | None:
        """The batch's images when denoising strength 0 repaints nothing; None where that does not apply."""
        return None

    def finish(self, images: list[Image.Image]) -> list[Image.Image]:
        return images


class TextSource(Source):
    """txt2img: the first pass starts from noise."""

    starts_from_text = True

    def first_pass(self, batch, noise, encode, inpainting_model):
        return None, None


class ImageSource(Source):
    """img2img: the init images, resized (modes 0-2) or upscaled in latent space (mode 3)."""

    def __init__(self, request: GenerationRequest, factor: int, warnings: list[str]) -> None:
        super().__init__(request, factor)
        self.images = [decode_image(b, f"init_images[{i}]") for i, b in enumerate(request.init_images)]

    def _resized(self, batch: int) -> list[Image.Image]:
        r = self.request
        mode = 0 if r.resize_mode == 3 else r.resize_mode
        return [resize_image(mode, img, r.width, r.height) for img in expand_for_batch(self.images, batch)]

    def first_pass(self, batch, noise, encode, inpainting_model):
        r, f = self.request, self.factor
        if r.resize_mode == 3 and not inpainting_model:
            images = expand_for_batch(self.images, batch)
            latents = torch.cat([encode([img.resize((img.width // f * f, img.height // f * f))]) for img in images])
            return InitImage(hires.upscale_latents(latents, r.width, r.height, "Latent", f), r.denoising_strength), None
        return InitImage(self._resized(batch), r.denoising_strength), None

    def unchanged(self, batch):
        return self._resized(batch)


class InpaintSource(Source):
    """inpaint: the masked init images (A1111's blur, only-masked crop and fill), composited back at the end."""

    def __init__(self, request: GenerationRequest, factor: int, warnings: list[str]) -> None:
        super().__init__(request, factor)
        inits = [decode_image(b, f"init_images[{i}]") for i, b in enumerate(request.init_images)]
        mask = decode_image(request.mask, "mask", mode="L")
        if any(img.size != mask.size for img in inits):
            raise InvalidRequestError("mask", f"`mask` size {mask.width}x{mask.height} does not match every init image")
        self.job = inpaint.prepare(request, expand_for_batch(inits, request.batch_size), mask)
        if self.job.note:
            warnings.append(self.job.note)
        if request.resize_mode == 3:
            warnings.append("resize mode 3 (latent upscale) does not apply to inpainting; images were resized")

    def first_pass(self, batch, noise, encode, inpainting_model):
        r, f, job = self.request, self.factor, self.job
        hole = inpaint.latent_mask(job.mask, r.width // f, r.height // f)
        fill = inpaint.latent_fill(r.inpainting_fill, hole, noise)
        return InitImage(job.images[:batch], r.denoising_strength), InpaintMask(job.mask, latent_fill=fill)

    def unchanged(self, batch):
        return self.finish(self.job.images[:batch])

    def finish(self, images):
        return [inpaint.finish(self.job, img, i) for i, img in enumerate(images)]


_SOURCES: dict[str, Callable[[GenerationRequest, int, list[str]], Source]] = {
    "txt2img": lambda request, factor, _warnings: TextSource(request, factor),
    "img2img": ImageSource,
    "inpaint": InpaintSource,
}


def prepare_source(request: GenerationRequest, factor: int, warnings: list[str]) -> Source:
    """Decode and prepare the request's images for its mode (warnings for what was adapted)."""
    return _SOURCES[request.mode](request, factor, warnings)
