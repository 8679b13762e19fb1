"""Live previews: a linear latent→RGB approximation, no VAE decode.

A VAE decode per preview would cost as much as a sampling step on a small GPU; a 4×3 matrix product
on the latent costs nothing and is what A1111's "Approx cheap" and ComfyUI's latent2rgb show. The
factors are the widely published per-channel fits for the SD1.x and SDXL latent spaces.
"""

from __future__ import annotations

import io

import torch

# rows: latent channels 0..3, columns: R, G, B
SD15_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_BIAS = (0.1084, -0.0175, -0.0011)


def latents_to_rgb(latents: torch.Tensor, *, sdxl: bool) -> torch.Tensor:
    """``[B, 4, h, w]`` latents → ``[B, h, w, 3]`` uint8 (one latent pixel per output pixel)."""
    factors = torch.tensor(SDXL_FACTORS if sdxl else SD15_FACTORS, dtype=torch.float32)
    x = latents.detach().float().cpu()
    rgb = torch.einsum("bchw,cr->bhwr", x, factors)
    if sdxl:
        rgb = rgb + torch.tensor(SDXL_BIAS)
    return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)


def preview_png(latents: torch.Tensor, *, sdxl: bool, index: int = 0, upscale: int = 4) -> bytes:
    """PNG bytes of image ``index`` of the batch, upscaled ×``upscale`` (nearest) so it is viewable."""
    from PIL import Image

    rgb = latents_to_rgb(latents[index:index + 1], sdxl=sdxl)[0].numpy()
    image = Image.fromarray(rgb, "RGB")
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
