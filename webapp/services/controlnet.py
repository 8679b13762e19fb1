"""ControlNet outside a job: the caller's ControlNet models in the extension's naming, preprocessor runs
(the UI's Preview and ``/controlnet/detect``) and OpenPose JSON drawn into pose maps
(``/controlnet/render_openpose_json``).

Preprocessing is CPU work done in the web process, so it is bounded here: images per call, pixels per image
(``max_job_pixels``, checked from the header before decoding) and runs at once (a semaphore; a caller that
waits too long gets 429). Pose rendering shares those bounds: canvases per call, pixels per canvas, the slots.
The one ``Annotators`` (detectors loaded once, weights only from the annotators folder) is built by app.py
and handed in.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.controlnet.poses import render_pose_json
from pipelines.controlnet.preprocessors import (
    Annotators,
    BrokenAnnotator,
    MissingAnnotator,
    PreprocessorInputError,
    UnknownPreprocessor,
    resolve,
)
from pipelines.images import decode_image, image_size
from pipelines.types import InvalidRequestError, decode_image_bytes
from webapp.records import ModelRecord, ModelType, User
from webapp.services.errors import InvalidInput, ServiceError, Throttled
from webapp.services.jobs.requests import Registry, base_family, controlnet_title

log = logging.getLogger(__name__)

WAIT_SECONDS = 30.0
"""How long a preprocessor run waits for a free slot before the caller is told to retry."""


class AnnotatorUnavailable(ServiceError):
    """503: the request is fine but the server lacks (or has a broken) annotator weight file that an admin
    must put in the annotators folder; retrying after that succeeds, so this is not the client's 4xx."""

    status = 503


@dataclass(frozen=True)
class Detection:
    images: list[bytes]
    """One PNG map per input image."""
    poses: list[dict[str, Any]] | None = None
    """OpenPose JSON per image for the openpose modules."""
    warnings: list[str] = field(default_factory=list)


class ControlNetService:
    def __init__(self, registry: Registry, annotators: Annotators, *, max_pixels: int, max_images: int = 4,
                 concurrency: int = 1) -> None:
        self.registry = registry
        self.annotators = annotators
        self.max_pixels = max_pixels
        self.max_images = max_images
        self._slots = threading.BoundedSemaphore(concurrency)

    # -- models -------------------------------------------------------------------------------------------
    def models(self, *, actor: User, base: str | None = None) -> list[ModelRecord]:
        """Active ControlNet models ``actor`` may use, by name; only those of ``base``'s family when given."""
        records = self.registry.list_models(actor=actor, type=ModelType.CONTROLNET)
        if base:
            family = base_family(base)
            records = [r for r in records if not r.base or base_family(r.base) == family]
        return sorted(records, key=lambda r: r.name.lower())

    def model_titles(self, *, actor: User, base: str | None = None) -> list[str]:
        """The extension's ``name [hash8]`` names."""
        return [controlnet_title(r) for r in self.models(actor=actor, base=base)]

    def find_title(self, *, actor: User, ref: str) -> str | None:
        """The ``name [hash8]`` of the ControlNet model ``ref`` (name, title or hash) names for ``actor``."""
        record = self.registry.find(actor=actor, type=ModelType.CONTROLNET, ref=ref)
        return controlnet_title(record) if record is not None else None

    # -- preprocessing ------------------------------------------------------------------------------------
    def detect(self, *, actor: User, module: str, images: Sequence[Any], masks: Sequence[Any] = (),
               processor_res: float = -1, threshold_a: float = -1, threshold_b: float = -1,
               field_prefix: str = "controlnet_") -> Detection:
        """Run preprocessor ``module`` on each image (base64 strings or encoded bytes); blocking: call it from a
        worker thread. Fields in errors are named as in ``/controlnet/detect``'s body."""
        try:
            pre = resolve(module)
        except UnknownPreprocessor as exc:
            raise InvalidInput(str(exc), field=f"{field_prefix}module") from None
        if not images:
            raise InvalidInput("send at least one image", field=f"{field_prefix}input_images")
        if len(images) > self.max_images:
            raise InvalidInput(f"at most {self.max_images} images per call, got {len(images)}",
                               field=f"{field_prefix}input_images")
        if masks and len(masks) != len(images):
            raise InvalidInput(f"send one mask per image ({len(images)}) or none, got {len(masks)}",
                               field=f"{field_prefix}masks")
        decoded = [self._image(value, f"{field_prefix}input_images[{i}]") for i, value in enumerate(images)]
        mask_images = [self._image(value, f"{field_prefix}masks[{i}]", "L") for i, value in enumerate(masks)]
        if not self._slots.acquire(timeout=WAIT_SECONDS):
            raise Throttled("the ControlNet preprocessors are busy; try again shortly", retry_after=5)
        try:
            return self._run(pre.name, decoded, mask_images, processor_res, threshold_a, threshold_b, field_prefix)
        finally:
            self._slots.release()
            log.debug("preprocessor %s run by %s on %d image(s)", pre.name, actor.username, len(decoded))

    def render_poses(self, *, actor: User, poses: Sequence[Any], field_name: str = "pose_data") -> list[bytes]:
        """Draw each OpenPose JSON canvas as the openpose preprocessors draw their maps (PNG bytes); blocking."""
        if len(poses) > self.max_images:
            raise InvalidInput(f"at most {self.max_images} poses per call, got {len(poses)}", field=field_name)
        if not self._slots.acquire(timeout=WAIT_SECONDS):
            raise Throttled("the ControlNet preprocessors are busy; try again shortly", retry_after=5)
        try:
            maps = []
            for index, pose in enumerate(poses):
                image = render_pose_json(pose, max_pixels=self.max_pixels, field=f"{field_name}[{index}]")
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                maps.append(buffer.getvalue())
            return maps
        except InvalidRequestError as exc:
            raise InvalidInput(str(exc), field=exc.field) from None
        finally:
            self._slots.release()
            log.debug("%d pose(s) rendered for %s", len(poses), actor.username)

    def _image(self, value: Any, field_name: str, mode: str = "RGB") -> Any:
        try:
            data = decode_image_bytes(value, field_name)
            image_size(data, field_name, self.max_pixels)
            return decode_image(data, field_name, mode)
        except InvalidRequestError as exc:
            raise InvalidInput(str(exc), field=exc.field) from None

    def _run(self, module: str, images: list[Any], masks: list[Any], processor_res: float, threshold_a: float,
             threshold_b: float, field_prefix: str) -> Detection:
        maps: list[bytes] = []
        poses: list[dict[str, Any]] = []
        warnings: list[str] = []
        for index, image in enumerate(images):
            try:
                result = self.annotators.run(module, image, processor_res=processor_res, threshold_a=threshold_a,
                                             threshold_b=threshold_b, mask=masks[index] if masks else None)
            except PreprocessorInputError as exc:
                name = f"{field_prefix}masks" if exc.field == "mask" else f"{field_prefix}input_images"
                raise InvalidInput(str(exc), field=f"{name}[{index}]") from None
            except (MissingAnnotator, BrokenAnnotator) as exc:
                raise AnnotatorUnavailable(str(exc), field=f"{field_prefix}module") from None
            buffer = io.BytesIO()
            result.image.save(buffer, format="PNG")
            maps.append(buffer.getvalue())
            if result.pose is not None:
                poses.append(result.pose)
            warnings += [w for w in result.warnings if w not in warnings]
        return Detection(images=maps, poses=poses or None, warnings=warnings)


def png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
