"""A job's input images (init images, inpaint mask, ControlNet unit images and masks) in the asset store.

Clients send images as base64 inside the request. ``JobService.submit`` validates the request once
(``requests.RequestResolver``), then ``stage`` turns the validated bytes into blobs under
``inputs/<job_id>/<n>.<ext>`` (the bytes as sent, in their own format; one blob per distinct image) and the
row keeps two small texts instead of megabytes of base64:

* ``request_json``: the request exactly as submitted, with each image's base64 payload replaced by a reference
  ``store:inputs/<job_id>/<n>.<ext>`` (a data URI keeps its ``data:image/...;base64,`` header in front);
  ``as_submitted`` puts the base64 back for the readers that echo the request (the /api/v1 job view, History's
  curl), so they answer what they answered before.
* ``engine_request_json``: the validated engine request and ControlNet units in their own JSON form, images as
  ``store:<key>``; the dispatcher turns it back into typed values (``load``) without validating again.

References are only ever made here, only resolved in the places images are parsed from, and only when they
name the job's own ``inputs/<job_id>/`` folder: a client cannot send one (``store:`` is not base64, so the
submit-time validation refuses it), and a row cannot point at another job's inputs. Rows written before
inputs moved here hold inline base64 and no engine form; they still run (the dispatcher parses them once).
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from deploy.storage import BlobNotFound, BlobStore
from pipelines.controlnet.units import FIELD_PREFIX, ControlUnit, SlotPath, find_script, image_slots
from pipelines.types import GenerationRequest, InvalidRequestError, data_uri_header, encode_image_b64
from webapp.records import Job
from webapp.services.errors import InvalidInput

log = logging.getLogger(__name__)

INPUTS_PREFIX = "inputs/"
REF_SCHEME = "store:"
_REF = re.compile(r"(data:image/[^,]*,)?store:(inputs/([0-9A-Za-z_-]+)/\d+\.[a-z0-9]+)")
# Magic bytes -> (extension, content type) of the formats PIL reads that clients send.
_FORMATS = ((b"\x89PNG\r\n\x1a\n", "png", "image/png"), (b"\xff\xd8\xff", "jpg", "image/jpeg"),
            (b"GIF8", "gif", "image/gif"), (b"BM", "bmp", "image/bmp"), (b"II*\x00", "tif", "image/tiff"),
            (b"MM\x00*", "tif", "image/tiff"))

Path = SlotPath
"""Keys and list indices from the request root down to one image."""


class MissingInput(Exception):
    """A job's input image is not in the asset store (deleted behind the studio's back)."""


def input_prefix(job_id: str) -> str:
    return f"{INPUTS_PREFIX}{job_id}/"


def _format(data: bytes) -> tuple[str, str]:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    for magic, ext, content_type in _FORMATS:
        if data.startswith(magic):
            return ext, content_type
    return "bin", "application/octet-stream"  # validated by PIL all the same; kept as sent


@dataclass(frozen=True)
class StagedInputs:
    """What ``submit`` writes for one job: the two row texts and the blobs they reference."""

    request_json: str
    engine_request_json: str
    blobs: tuple[tuple[str, bytes, str], ...]
    """(key, bytes, content type) per distinct image."""

    @property
    def keys(self) -> list[str]:
        return [key for key, _, _ in self.blobs]

    @property
    def stored_bytes(self) -> int:
        """What the job takes at submit: both texts and the input images (the disk quota counts them)."""
        texts = len(self.request_json.encode()) + len(self.engine_request_json.encode())
        return texts + sum(len(data) for _, data, _ in self.blobs)


class _Keys:
    """One key per distinct image of a job, numbered in order of first use."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.blobs: dict[bytes, tuple[str, str]] = {}

    def key(self, data: bytes) -> str:
        if data not in self.blobs:
            ext, content_type = _format(data)
            self.blobs[data] = (f"{input_prefix(self.job_id)}{len(self.blobs)}.{ext}", content_type)
        return self.blobs[data][0]

    def ref(self, data: bytes) -> str:
        return REF_SCHEME + self.key(data)


def _plain(value: Any) -> Any:
    """A copy of a JSON-shaped value that can be changed in place (mappings -> dicts, sequences -> lists)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _get(root: Any, path: Path) -> Any:
    for step in path:
        if isinstance(root, Mapping):
            root = root.get(step)
        elif isinstance(root, list) and isinstance(step, int) and 0 <= step < len(root):
            root = root[step]
        else:
            return None
    return root


def _set(root: Any, path: Path, value: Any) -> None:
    for step in path[:-1]:
        root = root[step]
    root[path[-1]] = value


def _unit_paths(request: Mapping[str, Any]) -> Iterator[tuple[int, Mapping[str, Any], Path]]:
    """(args index, unit dict, path of the unit from the request root) of every ControlNet unit."""
    scripts = request.get("alwayson_scripts")
    found = find_script(scripts) if isinstance(scripts, Mapping) else None
    if found is None:
        return
    key, script = found
    args = script.get("args") if isinstance(script, Mapping) else None
    for index, unit in enumerate(args if isinstance(args, list) else ()):
        if isinstance(unit, Mapping):
            yield index, unit, ("alwayson_scripts", key, "args", index)


def _candidate_paths(request: Mapping[str, Any]) -> Iterator[Path]:
    """Every place of a request an image may be parsed from (for resolving references)."""
    images = request.get("init_images")
    if isinstance(images, list):
        yield from (("init_images", i) for i in range(len(images)))
    yield ("mask",)
    for index, unit, path in _unit_paths(request):
        try:
            slots = image_slots(index, unit)
        except InvalidRequestError:
            continue
        yield from ((*path, *slot) for slot in slots.values())


class JobInputs:
    """Writes, reads, resolves and deletes the input images of jobs in one asset store."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store

    # -- submit -----------------------------------------------------------------------------------------
    def stage(self, *, job_id: str, request: Mapping[str, Any], engine: GenerationRequest,
              units: Mapping[int, ControlUnit]) -> StagedInputs:
        """The row texts and blobs for a validated job. ``engine`` and ``units`` (by their ``args`` index) are
        what the submit-time validation parsed from ``request``; their images are the bytes stored."""
        keys = _Keys(job_id)
        stored = _plain(request)
        for path, data in self._parsed_images(request, engine, units):
            original = _get(request, path)
            if not isinstance(original, str | bytes | bytearray) or not original:
                raise RuntimeError(f"job {job_id}: no image at {path} where the request was parsed from")
            header = data_uri_header(original) if isinstance(original, str) else ""
            _set(stored, path, header + keys.ref(data))
        try:
            request_json = json.dumps(stored)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"the request is not JSON-serialisable: {exc}", field="request") from None
        engine_request_json = json.dumps({
            "request": engine.to_dict(encode_image=keys.ref),
            "controlnet_units": [unit.to_dict(encode_image=keys.ref) for unit in units.values()],
        })
        blobs = tuple((key, data, content_type) for data, (key, content_type) in keys.blobs.items())
        return StagedInputs(request_json, engine_request_json, blobs)

    @staticmethod
    def _parsed_images(request: Mapping[str, Any], engine: GenerationRequest,
                       units: Mapping[int, ControlUnit]) -> Iterator[tuple[Path, bytes]]:
        """(path in ``request``, parsed bytes) of every image the validation parsed, found where it read them."""
        yield from ((("init_images", i), data) for i, data in enumerate(engine.init_images))
        if engine.mask is not None:
            yield ("mask",), engine.mask
        for index, unit_dict, path in _unit_paths(request):
            unit = units.get(index)
            if unit is None:
                continue  # disabled: never parsed, kept as sent
            slots = image_slots(index, unit_dict)
            for name in ("image", "mask"):
                data = getattr(unit, name)
                if data is not None:
                    yield (*path, *slots[name]), data

    def write(self, staged: StagedInputs) -> None:
        """Store the blobs; on failure delete those already written and raise."""
        written: list[str] = []
        try:
            for key, data, content_type in staged.blobs:
                self.store.put(key, io.BytesIO(data), content_type=content_type)
                written.append(key)
        except BaseException:
            self.delete(written)
            raise

    # -- run ----------------------------------------------------------------------------------------------
    def load(self, job: Job) -> tuple[GenerationRequest, tuple[ControlUnit, ...]]:
        """The engine request and units a job was validated with at submit, images read back as bytes.
        Raises ``MissingInput`` when an image is gone from the store."""
        form = json.loads(job.engine_request_json or "{}")
        read = self._reader(job.id)

        def decode(value: Any, field: str) -> bytes:
            match = _REF.fullmatch(value) if isinstance(value, str) else None
            if match is None or match.group(1) or match.group(3) != job.id:
                raise InvalidRequestError(field, f"`{field}` of the stored job is not one of its input images")
            return read(match.group(2))

        request = GenerationRequest.from_dict(form["request"], decode_image=decode)
        units = tuple(ControlUnit.from_dict(unit, decode_image=lambda value, name, i=i: decode(
            value, f"{FIELD_PREFIX}[{i}].{name}")) for i, unit in enumerate(form.get("controlnet_units") or ()))
        return request, units

    def _reader(self, job_id: str) -> Callable[[str], bytes]:
        cache: dict[str, bytes] = {}

        def read(key: str) -> bytes:
            if key not in cache:
                try:
                    with self.store.open(key) as handle:
                        cache[key] = handle.read()
                except BlobNotFound:
                    raise MissingInput(f"input image {key} of job {job_id} is missing from the asset store") from None
            return cache[key]

        return read

    # -- readers ------------------------------------------------------------------------------------------
    def as_submitted(self, job: Job) -> dict[str, Any]:
        """The request as the client sent it: references replaced by the images' base64 again (an image gone
        from the store keeps its reference, logged)."""
        request = job.request
        read = self._reader(job.id)
        for path in list(_candidate_paths(request)):
            value = _get(request, path)
            match = _REF.fullmatch(value) if isinstance(value, str) else None
            if match is None or match.group(3) != job.id:
                continue
            try:
                _set(request, path, (match.group(1) or "") + encode_image_b64(read(match.group(2))))
            except MissingInput as exc:
                log.warning("%s; answering with its reference", exc)
        return request

    def keys_of(self, job: Job) -> list[str]:
        """The input blobs a job's row references."""
        form = job.engine_request_json or ""
        return sorted({m.group(2) for m in _REF.finditer(form) if m.group(3) == job.id})

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.store.delete(key)
            except Exception:  # noqa: BLE001 - best effort: the orphan sweep removes what is left
                log.exception("could not delete input %s", key)
