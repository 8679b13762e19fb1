"""What one sampling pass is given: typed inputs instead of a bag of optional keyword arguments.

A job runs one to three passes (base, SDXL refiner, hires fix); each is one call of a diffusers pipeline.
A ``PassSpec`` names what the call starts from (``init``: images or latents to denoise, absent for
txt2img), where it may repaint (``mask``) and which extra conditioning steers it (``controls``). The
diffusers task follows from those inputs (``PassSpec.task``), and the pipeline class from the model family,
the task and the controls' variant (``pipeline_class_name``), so a new kind of control registers its
pipeline classes instead of adding ``if mode ==`` branches.

Controls come per job as ``ControlSource``s (e.g. one per ControlNet unit); the job asks each source for its
``ControlInput`` for every pass (``PassTarget``: phase, task, size, batch), so a unit decides itself whether
it applies to the hires pass and at which size its image is prepared. The inputs of one pass share a
variant and are combined into the call's keyword arguments by that variant (several ControlNet units make
one multi-ControlNet call).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
from PIL import Image

from pipelines.errors import PipelineError

if TYPE_CHECKING:
    from pipelines.sampling import CondSchedule

Task = Literal["txt2img", "img2img", "inpaint"]
TASKS: tuple[Task, ...] = ("txt2img", "img2img", "inpaint")

# (sdxl, task, control variant) -> diffusers class name; variant None = no controls
_PIPELINE_CLASSES: dict[tuple[bool, Task, str | None], str] = {
    (False, "txt2img", None): "StableDiffusionPipeline",
    (False, "img2img", None): "StableDiffusionImg2ImgPipeline",
    (False, "inpaint", None): "StableDiffusionInpaintPipeline",
    (True, "txt2img", None): "StableDiffusionXLPipeline",
    (True, "img2img", None): "StableDiffusionXLImg2ImgPipeline",
    (True, "inpaint", None): "StableDiffusionXLInpaintPipeline",
}


# class name -> the components a job puts on that pipeline for a pass (cleared when the job ends)
_PIPELINE_PARTS: dict[str, tuple[str, ...]] = {}


def register_pipeline_classes(variant: str, classes: Mapping[tuple[bool, Task], str],
                              parts: Sequence[str] = ()) -> None:
    """Name the diffusers classes that accept controls of ``variant``: ``{(sdxl, task): class name}``.

    ``parts`` names the pipeline components the controls bring per pass (``ControlInput.pipeline_parts``,
    e.g. ``controlnet``); the engine sets them for the pass and clears them when the job ends."""
    for (sdxl, task), name in classes.items():
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)} but is {task!r}")
        _PIPELINE_CLASSES[(sdxl, task, variant)] = name
        _PIPELINE_PARTS[name] = tuple(parts)


def pipeline_part_names(pipe: Any) -> tuple[str, ...]:
    """The per-pass components of ``pipe``'s class (empty for the pipelines without controls)."""
    return _PIPELINE_PARTS.get(type(pipe).__name__, ())


def pipeline_class_name(sdxl: bool, task: Task, variant: str | None = None) -> str:
    """The diffusers class that runs ``task`` for the model family with controls of ``variant``."""
    try:
        return _PIPELINE_CLASSES[(sdxl, task, variant)]
    except KeyError:
        family = "SDXL" if sdxl else "SD1.x/2.x"
        raise PipelineError(f"no pipeline runs {task} with {variant} controls for {family} models") from None


@dataclass(frozen=True)
class InitImage:
    """What an img2img/inpaint pass denoises: PIL images (one per batch item) or a latent tensor."""

    image: list[Image.Image] | torch.Tensor
    strength: float = 1.0
    denoising_start: float | None = None  # SDXL refiner: take over at this fraction of the schedule

    @property
    def is_latent(self) -> bool:
        return isinstance(self.image, torch.Tensor)


@dataclass(frozen=True)
class InpaintMask:
    """Where an inpaint pass repaints (white), plus the optional latent-space treatments of the hole."""

    mask: Image.Image
    masked_image_latents: torch.Tensor | None = None  # what the model sees under the mask, when not the init
    latent_fill: Callable[[torch.Tensor], torch.Tensor] | None = None  # replaces the hole of the init latents


@dataclass(frozen=True)
class PassTarget:
    """The pass a control input is asked for: its phase ("base", "refiner", "hires"), task, size and batch."""

    phase: str
    task: Task
    width: int
    height: int
    batch: int


class ControlInput(ABC):
    """One conditioning input of a pass beyond the prompt (e.g. one ControlNet unit, prepared for the pass).

    ``variant`` names the family of pipelines that accept it (see ``register_pipeline_classes``);
    ``pipeline_kwargs`` combines all inputs of a pass (same variant) into that call's keyword arguments.
    """

    variant: ClassVar[str]

    @classmethod
    @abstractmethod
    def pipeline_kwargs(cls, inputs: Sequence[ControlInput], task: Task) -> dict[str, Any]:
        """Keyword arguments for a ``task`` pipeline call carrying ``inputs``."""

    @classmethod
    def pipeline_parts(cls, inputs: Sequence[ControlInput]) -> dict[str, Any]:
        """Pipeline components the pass needs for ``inputs`` (e.g. its ControlNet modules); none by default."""
        return {}


class ControlSource(Protocol):
    """A per-job control (e.g. a ControlNet unit as requested): its input for a pass, or None to sit it out."""

    def for_pass(self, target: PassTarget) -> ControlInput | None: ...


@dataclass(frozen=True)
class PassSpec:
    """Everything one pipeline call needs besides the pipeline."""

    steps: int
    cfg_scale: float
    conds: CondSchedule
    noise: torch.Tensor  # [B, 4, h, w] CPU float32
    generators: list[torch.Generator]
    width: int
    height: int
    phase: str = "base"
    init: InitImage | None = None
    mask: InpaintMask | None = None
    controls: tuple[ControlInput, ...] = ()
    denoising_end: float | None = None  # SDXL base: hand over to the refiner at this fraction
    eta: float | None = None
    output_type: str = "pil"

    def __post_init__(self) -> None:
        if self.mask is not None and self.init is None:
            raise ValueError("an inpaint pass needs the image it repaints (init)")
        if len({type(c).variant for c in self.controls}) > 1:
            raise PipelineError("the controls of one pass must be of one variant")

    @property
    def task(self) -> Task:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init is not None else "txt2img"

    @property
    def variant(self) -> str | None:
        return type(self.controls[0]).variant if self.controls else None

    @property
    def parts(self) -> dict[str, Any]:
        return type(self.controls[0]).pipeline_parts(self.controls) if self.controls else {}

    @property
    def target(self) -> PassTarget:
        return PassTarget(self.phase, self.task, self.width, self.height, self.noise.shape[0])
