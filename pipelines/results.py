"""Per-image infotext parameters for a finished job, in A1111's keys and order (a1111-api.md §7)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipelines import infotext
from pipelines.samplers import ResolvedSampler
from pipelines.types import GenerationRequest, ModelRef


@dataclass
class JobFacts:
    """What a job actually used, beyond the request (resolved names, hashes, networks)."""

    sampler: ResolvedSampler
    hr_sampler: ResolvedSampler | None
    checkpoint: ModelRef
    vae: ModelRef | None
    refiner: ModelRef | None
    lora_hashes: str | None
    ti_hashes: str | None
    hires_size: tuple[int, int] | None
    extra: Mapping[str, str] = field(default_factory=dict)
    """Pairs the caller adds for what it applied (e.g. the ``ControlNet N`` entries), before Version."""


def parameters(request: GenerationRequest, facts: JobFacts, seed: int, subseed: int) -> dict[str, Any]:
    """The ``Key: value`` pairs of one image's infotext (None values are skipped by the writer)."""
    variation = request.subseed_strength > 0
    resize = request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0
    p: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": facts.sampler.name,
        "Schedule type": facts.sampler.schedule_label,
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": facts.checkpoint.short_hash,
        "Model": facts.checkpoint.stem,
        "VAE hash": facts.vae.short_hash if facts.vae else None,
        "VAE": facts.vae.stem if facts.vae else None,
        "Variation seed": subseed if variation else None,
        "Variation seed strength": request.subseed_strength if variation else None,
        "Seed resize from": f"{request.seed_resize_from_w}x{request.seed_resize_from_h}" if resize else None,
        "Denoising strength": request.denoising_strength
        if request.mode != "txt2img" or request.enable_hr else None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "RNG": "CPU",
    }
    if request.eta is not None and facts.sampler.name == "DDIM":
        p["Eta DDIM"] = request.eta
    if request.mode == "txt2img" and request.enable_hr and facts.hires_size is not None:
        if request.hr_resize_x or request.hr_resize_y:
            p["Hires resize"] = f"{facts.hires_size[0]}x{facts.hires_size[1]}"
        else:
            p["Hires upscale"] = request.hr_scale
        p["Hires steps"] = request.hr_second_pass_steps or None
        p["Hires upscaler"] = request.effective_hr_upscaler
        if facts.hr_sampler is not None and facts.hr_sampler.name != facts.sampler.name:
            p["Hires sampler"] = facts.hr_sampler.name
        if (request.hr_scheduler and facts.hr_sampler is not None
                and facts.hr_sampler.schedule_label != facts.sampler.schedule_label):
            p["Hires schedule type"] = facts.hr_sampler.schedule_label
        if request.hr_prompt and request.hr_prompt != request.prompt:
            p["Hires prompt"] = request.hr_prompt
        if request.hr_negative_prompt and request.hr_negative_prompt != request.negative_prompt:
            p["Hires negative prompt"] = request.hr_negative_prompt
    if facts.refiner is not None and request.refiner_switch_at is not None:
        p["Refiner"] = f"{facts.refiner.stem} [{facts.refiner.short_hash}]"
        p["Refiner switch at"] = request.refiner_switch_at
    if request.mode == "inpaint":
        blur = request.mask_blur_x if request.mask_blur_x == request.mask_blur_y else None
        p["Mask blur"] = blur
        if blur is None:
            p["Mask blur x"], p["Mask blur y"] = request.mask_blur_x, request.mask_blur_y
        if request.inpainting_mask_invert:
            p["Mask mode"] = "Inpaint not masked"
        if request.inpaint_full_res:  # A1111's order: area and padding, then masked content
            p["Inpaint area"] = "Only masked"
            p["Masked area padding"] = request.inpaint_full_res_padding
        p["Masked content"] = infotext.MASKED_CONTENT[request.inpainting_fill]
    p["Lora hashes"] = facts.lora_hashes
    p["TI hashes"] = facts.ti_hashes
    p.update(facts.extra)
    p["Version"] = infotext.VERSION
    return p
