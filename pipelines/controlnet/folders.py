"""diffusers ControlNet folders, packed into one safetensors file that still knows its config.

SDXL ControlNets usually ship as a folder: `config.json` + `diffusion_pytorch_model(.fp16).safetensors`.
The asset store holds one blob per model, so an import packs the folder into a single diffusers-layout
safetensors file whose `__metadata__` carries the folder's config under `CONFIG_KEY`; the loader builds
the model from that config (not from a family skeleton), so the packed file loads exactly as the folder.

Packing copies the tensor bytes verbatim (a new header, then the old data section), so the weights are
bit-for-bit the folder's and a multi-GB file is streamed, never held in memory. The folder is checked
first: the config must be a ControlNetModel config that builds, the weights must fill that model exactly,
sizes are bounded, and a member that is a symlink leading out of the folder is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import safe_files
from pipelines.errors import IncompatibleModelError, ModelFormatError

logger = logging.getLogger(__name__)

CONFIG_KEY = "studio_diffusers_config"
"""safetensors metadata key holding a packed folder's config.json (a JSON object, as text)."""
CONTROLNET_CLASS = "ControlNetModel"
WEIGHTS = "diffusion_pytorch_model"
MAX_CONFIG_BYTES = 1024 * 1024
MAX_WEIGHTS_BYTES = 32 * 1024**3
"""The largest published ControlNets (SDXL, fp32) are ~5 GB; anything past this is not one."""
_COPY_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class ControlNetFolder:
    """A checked folder: its config and the weights file that fills it."""

    path: Path
    config: Mapping[str, Any]
    weights: Path
    header: safe_files.SafetensorsHeader


def _member(folder: Path, name: str) -> Path | None:
    """`folder/name` if it is a regular file inside the folder once symlinks are resolved; None if absent."""
    path = folder / name
    if not path.is_symlink() and not path.exists():
        return None
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise ModelFormatError(f"{folder.name}/{name} is a link to {resolved}, outside the folder; copy the file "
                               "into the folder instead")
    if not resolved.is_file():
        raise ModelFormatError(f"{folder.name}/{name} is not a regular file")
    return path


def weights_file(folder: Path) -> Path:
    """The folder's safetensors weights: the full-precision file if there is one, else the fp16 variant."""
    for name in (f"{WEIGHTS}.safetensors", f"{WEIGHTS}.fp16.safetensors"):
        found = _member(folder, name)
        if found is not None:
            return found
    pickled = [n for n in (f"{WEIGHTS}.bin", f"{WEIGHTS}.fp16.bin") if (folder / n).exists()]
    extra = f" (it has {pickled[0]}: pickled weights are not read)" if pickled else ""
    raise ModelFormatError(f"{folder.name}: a diffusers ControlNet folder needs {WEIGHTS}.safetensors or "
                           f"{WEIGHTS}.fp16.safetensors{extra}")


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json as a dict (bounded, JSON object), whatever model class it names."""
    path = _member(folder, "config.json")
    if path is None:
        raise ModelFormatError(f"{folder.name} has no config.json, so it is not a diffusers model folder")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelFormatError(f"{folder.name}/config.json is {size} bytes; a model config is under "
                               f"{MAX_CONFIG_BYTES} bytes")
    return parse_config(path.read_bytes(), source=f"{folder.name}/config.json")


def parse_config(raw: bytes | str, *, source: str) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{source} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelFormatError(f"{source} is a JSON {type(config).__name__}, not an object")
    return config


def is_controlnet_folder(path: Path) -> bool:
    """A folder whose config.json names ControlNetModel (a cheap look; `check_folder` validates it)."""
    try:
        return path.is_dir() and read_config(path).get("_class_name") == CONTROLNET_CLASS
    except (OSError, ModelFormatError):
        return False


def _meta_model(config: Mapping[str, Any], source: str):
    """The ControlNet `config` describes, on the meta device (no memory): proves the config builds."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    try:
        with init_empty_weights():
            return ControlNetModel.from_config(dict(config))
    except Exception as exc:  # noqa: BLE001 - any failure to build is the config's fault, reported as such
        raise ModelFormatError(f"{source} does not describe a ControlNet diffusers can build: "
                               f"{type(exc).__name__}: {exc}") from exc


def misfit(expected: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What keeps `shapes` from filling a model of `expected` shapes exactly; None when they fit."""
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if tuple(shapes[k]) != tuple(expected[k]))
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in
                (("missing tensors", missing), ("unexpected tensors", extra), ("tensors of the wrong shape", wrong))
                if keys]
    return "; ".join(problems) or None


def check_fill(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Refuse weights that do not fill the model `config` builds exactly (names and shapes)."""
    expected = {k: tuple(v.shape) for k, v in _meta_model(config, source).state_dict().items()}
    problem = misfit(expected, shapes)
    if problem:
        raise IncompatibleModelError(f"{source}: the weights do not fill the ControlNet its config describes: "
                                     f"{problem}")


def check_folder(folder: Path) -> ControlNetFolder:
    """Validate a diffusers ControlNet folder (see module docstring); errors name the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"{folder} is not a folder")
    config = read_config(folder)
    if config.get("_class_name") != CONTROLNET_CLASS:
        raise IncompatibleModelError(f"{folder.name}/config.json describes a {config.get('_class_name')!r}, not a "
                                     f"{CONTROLNET_CLASS}; only ControlNet folders are imported")
    weights = weights_file(folder)
    size = weights.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise ModelFormatError(f"{folder.name}/{weights.name} is {size} bytes; at most {MAX_WEIGHTS_BYTES}")
    header = safe_files.read_safetensors_header(weights)
    check_fill(config, header.shapes(), f"{folder.name}/config.json")
    return ControlNetFolder(folder, config, weights, header)


def _header_bytes(header: safe_files.SafetensorsHeader, metadata: Mapping[str, str]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    for name, info in sorted(header.tensors.items(), key=lambda item: item[1].start):
        entries[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [info.start, info.end]}
    raw = json.dumps(entries, separators=(",", ":"), sort_keys=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it


def pack_folder(folder: Path, target: Path) -> Path:
    """Write the checked `folder` as one safetensors file at `target` (atomically), config in its metadata.

    Deterministic: the same folder always gives the same bytes, so importing it twice finds the first import.
    """
    checked = check_folder(folder)
    config = {k: v for k, v in checked.config.items() if k != "_name_or_path"}  # where it was saved: not the model's
    metadata = {**checked.header.metadata, CONFIG_KEY: json.dumps(config, sort_keys=True)}
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, checked.weights.open("rb") as src:
            head = _header_bytes(checked.header, metadata)
            out.write(len(head).to_bytes(8, "little"))
            out.write(head)
            src.seek(checked.header.data_offset)
            shutil.copyfileobj(src, out, _COPY_CHUNK)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("packed ControlNet folder %s into %s (%d tensors)", folder, target, len(checked.header.tensors))
    return target


def embedded_config(metadata: Mapping[str, str], source: str) -> dict[str, Any] | None:
    """The config a packed folder carries in its safetensors metadata; None for any other file."""
    raw = metadata.get(CONFIG_KEY)
    if raw is None:
        return None
    config = parse_config(raw, source=f"{source} ({CONFIG_KEY})")
    if config.get("_class_name") != CONTROLNET_CLASS:
        raise IncompatibleModelError(f"{source}: its embedded config describes a {config.get('_class_name')!r}, "
                                     f"not a {CONTROLNET_CLASS}")
    return config


def check_packed(path: Path) -> None:
    """A safetensors file that carries an embedded config (a packed folder, or a file made to look like one)
    must build and be filled by its tensors, as a folder must; any other file passes untouched."""
    header = safe_files.read_safetensors_header(Path(path))
    config = embedded_config(header.metadata, Path(path).name)
    if config is not None:
        check_fill(config, header.shapes(), f"{Path(path).name} ({CONFIG_KEY})")
