"""Loading checkpoints into diffusers pipelines, air-gapped.

Single files (A1111 / Civitai LDM layout, .safetensors or a safe .ckpt) go through diffusers'
`from_single_file` with `config=<skeleton>` and `local_files_only=True`: the skeleton is chosen from
the tensors (pipelines.skeletons) and supplies configs and tokenizers, so nothing is ever fetched.
diffusers folders load with `from_pretrained(local_files_only=True)`. Every file is probed first, so
the wrong kind of file fails with a sentence naming it instead of a shape mismatch deep in diffusers.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import safe_files
from pipelines.errors import IncompatibleModelError, ModelFormatError
from pipelines.probe import Base, ModelInfo, ModelType, probe
from pipelines.safe_files import FileKind
from pipelines.skeletons import find_skeleton

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class _NoEmptyFp32Warning(logging.Filter):
    """diffusers warns on every ``module.to(dtype)`` that "modules ... should be kept in float32: []" —
    about an empty list, i.e. nothing. Dropped so real warnings stay visible in the server log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFp32Warning())

# The txt2img-capable class for each skeleton; img2img/inpaint variants are derived with from_pipe.
_PIPELINE_CLASSES = (
    "StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionXLPipeline",
    "StableDiffusionXLInpaintPipeline", "StableDiffusionXLImg2ImgPipeline",
)
_SD_FAMILY = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline")


def _pipeline_class(name: str) -> type:
    import diffusers

    if name not in _PIPELINE_CLASSES:
        raise IncompatibleModelError(f"pipeline class {name!r} is not one this engine runs ({', '.join(_PIPELINE_CLASSES)})")
    return getattr(diffusers, name)


def _class_for(info: ModelInfo) -> str:
    if info.base is Base.SDXL_REFINER:
        return "StableDiffusionXLImg2ImgPipeline"
    if info.base is Base.SDXL:
        return "StableDiffusionXLInpaintPipeline" if info.inpaint else "StableDiffusionXLPipeline"
    return "StableDiffusionInpaintPipeline" if info.inpaint else "StableDiffusionPipeline"


def _require(info: ModelInfo, path: Path, wanted: ModelType) -> None:
    if info.type is not wanted:
        what = info.type.value.replace("_", " ")
        raise IncompatibleModelError(f"{path.name} is a {what}, not a {wanted.value.replace('_', ' ')}")
    if not info.supported:
        raise IncompatibleModelError(f"{path.name}: {info.problem}")


def _load_folder(path: Path, info: ModelInfo, dtype: torch.dtype) -> Any:
    cls = _pipeline_class(_class_for(info))
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": True}
    if cls.__name__ in _SD_FAMILY:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    unet = path / "unet"
    if not any(unet.glob("diffusion_pytorch_model.safetensors")) and any(unet.glob("*.fp16.safetensors")):
        kwargs["variant"] = "fp16"
    return cls.from_pretrained(str(path), **kwargs)


def load_checkpoint(
    path: Path | str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    skeleton_dirs: Iterable[Path | str] = (), info: ModelInfo | None = None,
) -> Any:
    """Load a checkpoint file or diffusers folder as its txt2img pipeline on `device` in `dtype`.

    Returns StableDiffusionPipeline / StableDiffusionInpaintPipeline (9-channel UNet) /
    StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline (the refiner has no txt2img mode).
    `skeleton_dirs` are searched before the shipped skeletons. `info` skips a second probe when the
    caller already has one for this file.
    """
    import torch

    path = Path(path)
    dtype = dtype or torch.float32
    started = time.perf_counter()
    info = info or probe(path)
    _require(info, path, ModelType.CHECKPOINT)
    if info.format is FileKind.DIFFUSERS:
        pipe = _load_folder(path, info, dtype)
    else:
        if info.architecture is None:
            raise ModelFormatError(f"{path.name}: checkpoint architecture could not be read")
        skeleton = find_skeleton(info.architecture, skeleton_dirs)
        cls = _pipeline_class(skeleton.pipeline_class_name)
        guard = safe_files.safe_globals() if info.format is not FileKind.SAFETENSORS else contextlib.nullcontext()
        with guard:
            pipe = cls.from_single_file(
                str(path), config=str(skeleton.path), local_files_only=True, torch_dtype=dtype,
                **skeleton.pipeline_kwargs(),
            )
        logger.info("loaded %s as %s with skeleton %s", path.name, cls.__name__, skeleton.name)
    pipe.to(device)
    logger.info("%s ready on %s (%s) in %.2fs", path.name, device, dtype, time.perf_counter() - started)
    return pipe


_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def load_vae(
    path: Path | str, *, like: Any, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
) -> Any:
    """Load a standalone VAE (A1111 .safetensors/.pt, or a diffusers folder) shaped like `like.vae`.

    The configuration (scaling factor, force_upcast, block layout) comes from the pipeline the VAE
    will serve, so an SDXL VAE keeps SDXL's scaling factor. Training leftovers (`loss.*`, EMA) in old
    VAE checkpoints are dropped.
    """
    from diffusers import AutoencoderKL

    path = Path(path)
    info = probe(path)
    _require(info, path, ModelType.VAE)
    device = device if device is not None else like.vae.device
    dtype = dtype if dtype is not None else like.vae.dtype
    expected = like.vae.config.latent_channels
    if info.details.get("latent_channels") not in (None, expected):
        raise IncompatibleModelError(
            f"{path.name} has {info.details['latent_channels']} latent channels; this pipeline needs {expected}"
        )
    if info.format is FileKind.DIFFUSERS:
        vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    else:
        state = safe_files.load_state_dict(path)
        state = {k.removeprefix("first_stage_model."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k.startswith(_VAE_PREFIXES)}
        with tempfile.TemporaryDirectory(prefix="studio-vae-") as config_dir:
            like.vae.save_config(Path(config_dir) / "vae")
            try:
                vae = AutoencoderKL.from_single_file(
                    state, config=config_dir, subfolder="vae", local_files_only=True, torch_dtype=dtype,
                )
            except (RuntimeError, ValueError, KeyError) as exc:
                raise IncompatibleModelError(f"{path.name} does not fit this pipeline's VAE: {exc}") from exc
    return vae.to(device)
