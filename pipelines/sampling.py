"""One sampling pass through a diffusers pipeline, with our noise, conditioning, events and cancellation.

The diffusers pipeline does the work; this module only decides what goes in:

* ``prompt_embeds``/``negative_prompt_embeds`` (+ pooled for SDXL) from ``conditioning``, switched during
  sampling for A1111 prompt editing (``[from:to:when]``, ``[a|b]``) from ``callback_on_step_end``;
* the initial noise: ``latents=`` for txt2img, and for img2img/inpaint a per-call override of the
  scheduler's ``add_noise`` so the noise that is mixed into the init latents is ours (seeded per
  image) rather than the pipeline's own draw; the same hook applies "latent noise"/"latent nothing";
* ``callback_on_step_end`` checks ``should_cancel``/``should_skip`` after every step and raises ``Cancelled``
  or ``BatchSkipped``, and emits
  ``Progress`` with a cheap preview every N steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.conditioning import Conditioning
from pipelines.passes import PassSpec
from pipelines.previews import preview_png
from pipelines.types import BatchSkipped, Cancelled, Progress

logger = logging.getLogger(__name__)


@dataclass
class CondSchedule:
    """Positive/negative conditionings over the pass: ``[(last_step, Conditioning), ...]`` (same chunk counts)."""

    positive: list[tuple[int, Conditioning]]
    negative: list[tuple[int, Conditioning]]
    steps: int  # the step count the schedule was computed for

    @property
    def dynamic(self) -> bool:
        return len(self.positive) > 1 or len(self.negative) > 1

    @staticmethod
    def at(entries: list[tuple[int, Conditioning]], step: int) -> Conditioning:
        for end, cond in entries:
            if step <= end:
                return cond
        return entries[-1][1]


@dataclass
class EventSink:
    """Where a pass reports to; one per job."""

    on_event: Callable[[Progress], None] | None
    should_cancel: Callable[[], bool] | None
    preview_every: int
    sdxl: bool
    job_count: int
    job_no: int = 0
    should_skip: Callable[[], bool] | None = None

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("generation cancelled")
        if self.should_skip is not None and self.should_skip():
            raise BatchSkipped("batch skipped")


class _NoiseOverride:
    """Replaces ``scheduler.add_noise`` for one call: our noise, optional latent fill of the original."""

    def __init__(self, add_noise: Callable, noise: torch.Tensor, fill: Callable | None) -> None:
        self._add_noise = add_noise
        self._noise = noise
        self._fill = fill

    def __call__(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self._fill is not None:
            original = self._fill(original)
        ours = self._noise.to(device=noise.device, dtype=noise.dtype)
        if ours.shape != noise.shape:  # e.g. one init latent broadcast over the batch
            ours = ours.expand_as(noise) if ours.shape[1:] == noise.shape[1:] else noise
        return self._add_noise(original, ours, timesteps)


def placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a module's first parameter (diffusers' ``.device`` walks every submodule)."""
    param = next(module.parameters())
    return param.device, param.dtype


def _embeds(cond: Conditioning, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    embeds = cond.embeds.repeat(batch, 1, 1)
    pooled = cond.pooled.repeat(batch, 1) if cond.pooled is not None else None
    return embeds, pooled


def run_pass(pipe, spec: PassSpec, scheduler, sink: EventSink) -> Any:
    """Run one pipeline call; returns latents (``output_type="latent"``) or a list of PIL images."""
    batch = spec.noise.shape[0]
    sdxl = hasattr(pipe, "text_encoder_2")
    device, unet_dtype = placement(pipe.unet)
    init, mask = spec.init, spec.mask
    if init is not None:
        fill = mask.latent_fill if mask is not None else None
        scheduler.add_noise = _NoiseOverride(scheduler.add_noise, spec.noise, fill)
    pipe.scheduler = scheduler

    pos = CondSchedule.at(spec.conds.positive, 1)
    neg = CondSchedule.at(spec.conds.negative, 1)
    pos_e, pos_p = _embeds(pos, batch)
    neg_e, neg_p = _embeds(neg, batch)
    kwargs: dict[str, Any] = {
        "prompt_embeds": pos_e, "negative_prompt_embeds": neg_e,
        "num_inference_steps": spec.steps, "guidance_scale": spec.cfg_scale,
        "generator": list(spec.generators), "output_type": spec.output_type,
        "callback_on_step_end": _callback(spec, sink, sdxl, batch),
        "callback_on_step_end_tensor_inputs": ["latents"],
    }
    if sdxl:
        kwargs["pooled_prompt_embeds"] = pos_p
        kwargs["negative_pooled_prompt_embeds"] = neg_p
    if spec.eta is not None:
        kwargs["eta"] = spec.eta
    if init is None:
        kwargs.update(height=spec.height, width=spec.width,
                      latents=spec.noise.to(device=device, dtype=unet_dtype))
    else:
        steps = spec.steps
        if init.denoising_start is None:
            # A1111 always runs at least one step of img2img; diffusers runs int(steps * strength).
            while int(steps * init.strength) < 1:
                steps += 1
        kwargs.update(image=init.image, strength=init.strength, num_inference_steps=steps)
        if init.denoising_start is not None:
            kwargs["denoising_start"] = init.denoising_start
    if mask is not None:
        kwargs.update(mask_image=mask.mask, height=spec.height, width=spec.width)
        if init.strength >= 1.0:
            kwargs["latents"] = spec.noise.to(device=device, dtype=unet_dtype)
        if mask.masked_image_latents is not None:
            kwargs["masked_image_latents"] = mask.masked_image_latents
    if spec.denoising_end is not None:
        kwargs["denoising_end"] = spec.denoising_end
    if spec.controls:
        kwargs.update(type(spec.controls[0]).pipeline_kwargs(spec.controls, spec.task))
    sink.check_cancel()
    output = pipe(**kwargs)
    return output.images


def _callback(spec: PassSpec, sink: EventSink, sdxl: bool, batch: int):
    conds = spec.conds
    state = {"pos": CondSchedule.at(conds.positive, 1), "neg": CondSchedule.at(conds.negative, 1)}

    def on_step_end(pipe, i: int, _t, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        sink.check_cancel()
        total = max(int(getattr(pipe, "num_timesteps", 0) or spec.steps), i + 1)
        step = i + 1
        preview = None
        if sink.on_event is not None:
            if sink.preview_every > 0 and (step % sink.preview_every == 0 or step == total):
                preview = preview_png(callback_kwargs["latents"], sdxl=sink.sdxl)
            sink.on_event(Progress(step, total, sink.job_no, sink.job_count, spec.phase, preview))
        if not conds.dynamic or step >= total:
            return {}
        # Map the next executed step onto the schedule's step count (second-order samplers and
        # img2img run a different number of model calls than the schedule was written for).
        next_step = max(1, round((step + 1) * conds.steps / total))
        pos, neg = CondSchedule.at(conds.positive, next_step), CondSchedule.at(conds.negative, next_step)
        if pos is state["pos"] and neg is state["neg"]:
            return {}
        state["pos"], state["neg"] = pos, neg
        return _switch(pipe, pos, neg, batch, sdxl)

    return on_step_end


def _switch(pipe, pos: Conditioning, neg: Conditioning, batch: int, sdxl: bool) -> dict[str, Any]:
    pos_e, pos_p = _embeds(pos, batch)
    neg_e, neg_p = _embeds(neg, batch)
    device, dtype = placement(pipe.unet)
    cfg = pipe.do_classifier_free_guidance
    out = {"prompt_embeds": (torch.cat([neg_e, pos_e]) if cfg else pos_e).to(device=device, dtype=dtype)}
    if sdxl and pos_p is not None:
        out["add_text_embeds"] = (torch.cat([neg_p, pos_p]) if cfg else pos_p).to(device=device, dtype=dtype)
    return out


def expand_for_batch(images: Sequence[Any], batch: int) -> list[Any]:
    """A1111: one init image is repeated over the batch; several are used in turn."""
    return [images[i % len(images)] for i in range(batch)]
