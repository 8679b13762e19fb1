"""ControlNet units applied to a job's passes: one ``ControlNetSource`` per enabled unit.

A source prepares its unit's control map for each pass it joins (preprocessed once per processor
resolution by the worker's ``Annotators``, then fitted to the pass size by the unit's resize mode) and
gives the pass a ``ControlNetInput``. The inputs of one pass become one call of diffusers' ControlNet
pipelines: a ``UnitControlNets`` (a ``MultiControlNetModel``, also for a single unit) on the pipeline and
per-unit lists of images, weights (``controlnet_conditioning_scale``) and guidance start/end.

Control modes follow sd-webui-controlnet (``scripts/hook.py``): "Balanced" adds the residuals as they
are; "My prompt is more important" weights the 13 residuals softly, ``0.825 ** (12 - i)`` from the first
down block (×0.099) to the middle block (×1); "ControlNet is more important" weights them the same way
and adds them to the conditional half of the classifier-free-guidance batch only, so the guidance
pushes towards the control. That last mode is what diffusers calls ``guess_mode`` (residuals scaled by
a log-space ramp, uncond half zeroed), but diffusers' flag is one per call; here each unit keeps its own
mode, so several units with different modes run in one call as the extension runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image

from pipelines.controlnet.loader import controlnet_info
from pipelines.controlnet.preprocessors import Annotators, PreprocessorInputError
from pipelines.controlnet.preprocessors import resolve as resolve_preprocessor
from pipelines.controlnet.units import FIELD_PREFIX, ControlMode, ControlUnit, HiresOption, ResizeMode
from pipelines.images import decode_image, resize_image
from pipelines.passes import ControlInput, PassTarget, Task, register_pipeline_classes
from pipelines.types import GenerationRequest, InvalidRequestError, ModelRef

VARIANT = "controlnet"
SOFT_DECAY = 0.825
"""The extension's soft injection: residual i of 13 is weighted ``SOFT_DECAY ** (12 - i)``."""

register_pipeline_classes(VARIANT, {
    (False, "txt2img"): "StableDiffusionControlNetPipeline",
    (False, "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    (False, "inpaint"): "StableDiffusionControlNetInpaintPipeline",
    (True, "txt2img"): "StableDiffusionXLControlNetPipeline",
    (True, "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    (True, "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
}, parts=("controlnet",))


class UnitControlNets(MultiControlNetModel):
    """The ControlNets of one pass, each with its unit's control mode (see the module docstring).

    ``batch`` is the pass's batch size: a model input twice that size carries the unconditional half first
    (diffusers' classifier-free guidance order)."""

    def __init__(self, nets: Sequence[Any], modes: Sequence[ControlMode], batch: int) -> None:
        super().__init__(list(nets))
        self.modes = tuple(modes)
        self.batch = batch

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
                class_labels=None, timestep_cond=None, attention_mask=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, guess_mode=False, return_dict=True):
        cfg = sample.shape[0] == 2 * self.batch
        down_total: list[torch.Tensor] | None = None
        mid_total: torch.Tensor | None = None
        for image, scale, net, mode in zip(controlnet_cond, conditioning_scale, self.nets, self.modes, strict=True):
            down, mid = net(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                            controlnet_cond=image, conditioning_scale=scale, class_labels=class_labels,
                            timestep_cond=timestep_cond, attention_mask=attention_mask,
                            added_cond_kwargs=added_cond_kwargs, cross_attention_kwargs=cross_attention_kwargs,
                            guess_mode=False, return_dict=False)
            if mode is not ControlMode.BALANCED:
                count = len(down) + 1  # the middle block is the last residual, weighted 1
                down = [d * SOFT_DECAY ** (count - 1 - i) for i, d in enumerate(down)]
            if mode is ControlMode.CONTROLNET and cfg:
                down = [_conditional_only(d) for d in down]
                mid = _conditional_only(mid)
            if down_total is None:
                down_total, mid_total = list(down), mid
            else:
                down_total = [a + b for a, b in zip(down_total, down, strict=True)]
                mid_total = mid_total + mid
        return down_total, mid_total


def _conditional_only(residual: torch.Tensor) -> torch.Tensor:
    half = residual.shape[0] // 2
    return torch.cat([torch.zeros_like(residual[:half]), residual[half:]])


@dataclass(frozen=True)
class ControlNetInput(ControlInput):
    """One unit prepared for one pass: its model, its control map at the pass size and its weights."""

    variant: ClassVar[str] = VARIANT
    model: Any
    image: Image.Image
    weight: float
    guidance_start: float
    guidance_end: float
    mode: ControlMode
    batch: int

    @classmethod
    def pipeline_kwargs(cls, inputs: Sequence[ControlInput], task: Task) -> dict[str, Any]:
        units: list[ControlNetInput] = list(inputs)  # type: ignore[arg-type]
        return {"image" if task == "txt2img" else "control_image": [u.image for u in units],
                "controlnet_conditioning_scale": [u.weight for u in units],
                "control_guidance_start": [u.guidance_start for u in units],
                "control_guidance_end": [u.guidance_end for u in units]}

    @classmethod
    def pipeline_parts(cls, inputs: Sequence[ControlInput]) -> dict[str, Any]:
        units: list[ControlNetInput] = list(inputs)  # type: ignore[arg-type]
        return {"controlnet": UnitControlNets([u.model for u in units], [u.mode for u in units], units[0].batch)}


def pixel_perfect_resolution(image: Image.Image, width: int, height: int, resize_mode: ResizeMode) -> int:
    """The extension's pixel-perfect processor resolution: the image's short side scaled as the resize mode
    will scale it to the target (to fit for Resize and Fill, to cover otherwise)."""
    k_h, k_w = height / image.height, width / image.width
    k = min(k_h, k_w) if resize_mode is ResizeMode.RESIZE_AND_FILL else max(k_h, k_w)
    return round(k * min(image.width, image.height))


class ControlNetSource:
    """One enabled unit of a job: its ``ControlNetInput`` for every pass it joins (``ControlSource``)."""

    def __init__(self, index: int, unit: ControlUnit, model: Any, image: Image.Image, annotators: Annotators, *,
                 mask: Image.Image | None = None, hires: bool = False, warnings: list[str] | None = None) -> None:
        self.index = index
        self.unit = unit
        self.model = model
        self.image = image
        self.mask = mask
        self.annotators = annotators
        self.hires = hires
        self.warnings = warnings if warnings is not None else []
        self._detected: dict[int, Image.Image] = {}
        self._maps: dict[tuple[int, int], Image.Image] = {}
        self.detected_map: Image.Image | None = None
        """The control map of the first pass it joined (returned when the unit asks to save it)."""

    def joins(self, phase: str) -> bool:
        if phase == "refiner":  # the extension does not control the SDXL refiner
            return False
        option = self.unit.hr_option
        if phase == "hires":
            return option is not HiresOption.LOW_RES_ONLY
        return not (self.hires and option is HiresOption.HIGH_RES_ONLY)

    def for_pass(self, target: PassTarget) -> ControlNetInput | None:
        if not self.joins(target.phase):
            return None
        control = self.control_map(target.width, target.height)
        u = self.unit
        return ControlNetInput(model=self.model, image=control, weight=u.weight, guidance_start=u.guidance_start,
                               guidance_end=u.guidance_end, mode=u.control_mode, batch=target.batch)

    def control_map(self, width: int, height: int) -> Image.Image:
        """The unit's map for a ``width`` x ``height`` pass (preprocessed once per processor resolution)."""
        if (width, height) not in self._maps:
            u = self.unit
            res = (pixel_perfect_resolution(self.image, width, height, u.resize_mode) if u.pixel_perfect
                   else int(u.processor_res))
            if res not in self._detected:
                self._detected[res] = self._preprocess(res)
            mode = list(ResizeMode).index(u.resize_mode)  # A1111's resize modes 0-2, in the same order
            self._maps[(width, height)] = resize_image(mode, self._detected[res], width, height)
            if self.detected_map is None:
                self.detected_map = self._maps[(width, height)]
        return self._maps[(width, height)]

    def _preprocess(self, res: int) -> Image.Image:
        u = self.unit
        try:
            result = self.annotators.run(u.module, self.image, processor_res=res, threshold_a=u.threshold_a,
                                         threshold_b=u.threshold_b, mask=self.mask)
        except PreprocessorInputError as exc:
            field = f"{FIELD_PREFIX}[{self.index}].{exc.field}"
            raise InvalidRequestError(field, f"ControlNet unit {self.index}: {exc}") from None
        self.warnings.extend(f"ControlNet unit {self.index}: {w}" for w in result.warnings)
        return result.image.convert("RGB")


ControlNetLoader = Callable[[Path, str | None], Any]
"""Loads a ControlNet file (``PipelineCache.controlnet``: cached, on the cache's device and dtype)."""


def _job_mask(request: GenerationRequest) -> Image.Image:
    """The inpaint job's mask as the unit sees it: white = repaint (inverted when the job inverts it)."""
    from PIL import ImageOps

    assert request.mask is not None
    mask = decode_image(request.mask, "mask", mode="L")
    return ImageOps.invert(mask) if request.inpainting_mask_invert else mask


def build_sources(units: Sequence[ControlUnit], refs: Sequence[ModelRef], request: GenerationRequest, unet_config: Any,
                  load: ControlNetLoader, annotators: Annotators, warnings: list[str], *,
                  checkpoint_base: str | None = None) -> list[ControlNetSource]:
    """The sources of a job's enabled units (``refs``: their model files, in unit order). Each model is checked
    to fit the checkpoint's UNet (``BaseMismatch`` naming the unit) before any is loaded."""
    if len(units) != len(refs):
        raise ValueError(f"{len(units)} ControlNet units but {len(refs)} ControlNet models")
    positions = [unit.arg_index if unit.arg_index is not None else i for i, unit in enumerate(units)]
    for index, ref in zip(positions, refs, strict=True):
        controlnet_info(ref.path).check_fits(unet_config, unit=index, name=ref.name, checkpoint_base=checkpoint_base)
    hires = request.mode == "txt2img" and request.enable_hr
    sources = []
    for index, unit, ref in zip(positions, units, refs, strict=True):
        mask_field = f"{FIELD_PREFIX}[{index}].mask"
        mask = decode_image(unit.mask, mask_field, mode="L") if unit.mask else None
        if unit.image is not None:
            image = decode_image(unit.image, f"{FIELD_PREFIX}[{index}].image")
        elif request.init_images:  # the extension controls img2img with its own init image
            image = decode_image(request.init_images[0], "init_images[0]")
            if mask is None and request.mask is not None and resolve_preprocessor(unit.module).requires_mask:
                mask = _job_mask(request)  # ... and an inpaint unit with the job's own mask
        else:
            field = f"{FIELD_PREFIX}[{index}].image"
            raise InvalidRequestError(field, f"`{field}` is required: ControlNet unit {index} has no image and "
                                             "a txt2img job has no init image to use instead")
        sources.append(ControlNetSource(index, unit, load(ref.path, ref.sha256), image, annotators, mask=mask,
                                        hires=hires, warnings=warnings))
    return sources
