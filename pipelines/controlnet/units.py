"""ControlNet units as A1111 clients send them in ``alwayson_scripts.controlnet.args``, parsed once into typed,
frozen, JSON-safe values.

Field names, enums and legacy aliases follow sd-webui-controlnet's external API
(https://github.com/Mikubill/sd-webui-controlnet, `internal_controlnet/external_code.py` and `scripts/enums.py`)
and what webuiapi's ``ControlNetUnit.to_dict`` sends. Every error names the field as
``alwayson_scripts.controlnet.args[i].<field>`` so the edges answer 422 pointing at it. Images are decoded
once, to encoded image bytes (checked header-first by ``pipelines.images.open_image``); ``to_dict`` gives them
as base64 for the wire (or as whatever the caller's encoder makes of them: store references at rest).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipelines.controlnet.preprocessors import UnknownPreprocessor, resolve
from pipelines.images import image_size
from pipelines.types import (
    ImageDecoder,
    ImageEncoder,
    InvalidRequestError,
    decode_image_bytes,
    encode_image_b64,
)

SCRIPT_KEY = "controlnet"
FIELD_PREFIX = "alwayson_scripts.controlnet.args"


class ControlMode(enum.StrEnum):
    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROLNET = "ControlNet is more important"


class ResizeMode(enum.StrEnum):
    JUST_RESIZE = "Just Resize"
    CROP_AND_RESIZE = "Crop and Resize"
    RESIZE_AND_FILL = "Resize and Fill"


class HiresOption(enum.StrEnum):
    BOTH = "Both"
    LOW_RES_ONLY = "Low res only"
    HIGH_RES_ONLY = "High res only"


_LEGACY_RESIZE = {"inner fit (scale to fit)": ResizeMode.CROP_AND_RESIZE,
                  "envelope (outer fit)": ResizeMode.RESIZE_AND_FILL}
_ALIASES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "mask_image": "mask"}
_IGNORED = ("advanced_weighting", "effective_region_mask", "ipadapter_input", "pulid_mode", "union_control_type",
            "inpaint_crop_input_image")
NO_MODEL = "None"
SlotPath = tuple[str | int, ...]
"""Keys and list indices from a unit dict down to one of its images."""


@dataclass(frozen=True)
class ControlUnit:
    """One enabled unit. ``model`` is the reference as given (resolved against the caller's catalogue by the
    service); ``module`` is the preprocessor's canonical name; -1 for processor_res/thresholds means the
    preprocessor's default."""

    model: str = NO_MODEL
    module: str = "none"
    image: bytes | None = None
    """Encoded image bytes (PNG/JPEG/WebP), checked when parsed."""
    mask: bytes | None = None
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: ControlMode = ControlMode.BALANCED
    resize_mode: ResizeMode = ResizeMode.CROP_AND_RESIZE
    pixel_perfect: bool = False
    processor_res: float = -1
    threshold_a: float = -1
    threshold_b: float = -1
    hr_option: HiresOption = HiresOption.BOTH
    save_detected_map: bool = True
    low_vram: bool = False
    arg_index: int | None = None
    """The unit's position in ``alwayson_scripts.controlnet.args`` (what error messages name); None: its
    position among the enabled units."""

    @property
    def has_model(self) -> bool:
        return self.model.strip().lower() not in ("", "none")

    def to_dict(self, encode_image: ImageEncoder = encode_image_b64) -> dict[str, Any]:
        """JSON-safe: enums as their values, images as base64 (or what ``encode_image`` makes of them)."""
        data = {f.name: (v.value if isinstance(v := getattr(self, f.name), enum.Enum) else v)
                for f in dataclasses.fields(self)}
        for name in ("image", "mask"):
            if data[name] is not None:
                data[name] = encode_image(data[name])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], decode_image: ImageDecoder = decode_image_bytes) -> ControlUnit:
        """Inverse of ``to_dict`` for a unit already checked (``parse_unit`` checks one from outside)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key, kind in (("control_mode", ControlMode), ("resize_mode", ResizeMode), ("hr_option", HiresOption)):
            if key in values:
                values[key] = kind(values[key])
        for key in ("image", "mask"):
            if values.get(key) is not None:
                values[key] = decode_image(values[key], key)
        return cls(**values)


def _fail(index: int, name: str, message: str) -> InvalidRequestError:
    field = f"{FIELD_PREFIX}[{index}].{name}"
    return InvalidRequestError(field, f"`{field}` {message}")


def _enum(index: int, name: str, value: Any, kind: type[enum.StrEnum],
          legacy: Mapping[str, enum.StrEnum] | None = None) -> Any:
    members = list(kind)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(members):
        return members[value]
    if isinstance(value, str):
        text = value.strip().lower()
        for member in members:
            if member.value.lower() == text:
                return member
        if legacy and text in legacy:
            return legacy[text]
    choices = ", ".join(repr(m.value) for m in members)
    raise _fail(index, name, f"must be one of {choices} (or 0-{len(members) - 1}) but is {value!r}")


def _number(index: int, name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(index, name, f"must be a number but is {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise _fail(index, name, f"must be between {low} and {high} but is {value}")
    return float(value)


def _flag(index: int, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(index, name, f"must be true or false but is {value!r}")
    return value


def _image(index: int, name: str, value: Any, max_pixels: int | None) -> bytes | None:
    """The checked image's encoded bytes (base64 or a data URL decoded), or None for an empty value."""
    if value is None or value == "":
        return None
    field = f"{FIELD_PREFIX}[{index}].{name}"
    data = decode_image_bytes(value, field)
    image_size(data, field, max_pixels)
    return data


def image_slots(index: int, raw: Mapping[str, Any]) -> dict[str, SlotPath]:
    """Where unit ``raw`` holds its ``image`` and ``mask`` (paths inside the unit dict), as ``parse_unit`` reads
    them. The extension accepts the image (or ``input_image``) as a string, ``{"image": b64, "mask": b64}`` or
    ``[image, mask]``; a separate non-empty ``mask`` (or ``mask_image``) wins over the paired one. Callers that
    swap images for references walk the same paths, so they replace exactly what was parsed."""
    named: dict[str, str] = {}
    for key in raw:
        named[_ALIASES.get(key, key)] = key  # the last of a name and its alias wins, as in parse_unit
    slots: dict[str, SlotPath] = {}
    image_key = named.get("image")
    if image_key is not None:
        value = raw[image_key]
        if isinstance(value, Mapping):
            slots.update(image=(image_key, "image"), mask=(image_key, "mask"))
        elif isinstance(value, list | tuple):
            if not 1 <= len(value) <= 2:
                raise _fail(index, "image", f"as a list must be [image] or [image, mask] but has {len(value)} items")
            slots["image"] = (image_key, 0)
            if len(value) == 2:
                slots["mask"] = (image_key, 1)
        else:
            slots["image"] = (image_key,)
    mask_key = named.get("mask")
    if mask_key is not None and raw[mask_key] not in (None, ""):
        slots["mask"] = (mask_key,)
    return slots


def slot_value(raw: Any, path: SlotPath | None) -> Any:
    """The value at ``path`` (from ``image_slots``) inside ``raw``; None where there is none."""
    if path is None:
        return None
    for step in path:
        raw = raw.get(step) if isinstance(raw, Mapping) else raw[step]
    return raw


def _model(index: int, value: Any) -> str:
    if value is None:
        return NO_MODEL
    if not isinstance(value, str):
        raise _fail(index, "model", f"must be a model name but is {type(value).__name__}")
    return value.strip() or NO_MODEL


def _module(index: int, value: Any) -> str:
    if value is None:
        return "none"
    if not isinstance(value, str):
        raise _fail(index, "module", f"must be a preprocessor name but is {type(value).__name__}")
    try:
        return resolve(value).name
    except UnknownPreprocessor as exc:
        raise _fail(index, "module", f"names an {exc}") from None


def parse_unit(index: int, raw: Mapping[str, Any], warnings: list[str], max_pixels: int | None = None) -> ControlUnit:
    """One unit dict → ``ControlUnit`` (the caller has checked it is enabled)."""
    data: dict[str, Any] = {}
    for key, value in raw.items():
        data[_ALIASES.get(key, key)] = value
    ignored = [key for key in _IGNORED if data.get(key) not in (None, "", [], {}, False)]
    if ignored:
        warnings.append(f"ControlNet unit {index}: ignored {', '.join(ignored)} (not supported by this server)")
    slots = image_slots(index, raw)
    image, mask = slot_value(raw, slots.get("image")), slot_value(raw, slots.get("mask"))
    if _flag(index, "low_vram", data.get("low_vram", False)):
        warnings.append(f"ControlNet unit {index}: low_vram is accepted and has no effect on this server")
    start = _number(index, "guidance_start", data.get("guidance_start", 0.0), 0.0, 1.0)
    end = _number(index, "guidance_end", data.get("guidance_end", 1.0), 0.0, 1.0)
    if start > end:
        raise _fail(index, "guidance_start", f"must not be after guidance_end ({start} > {end})")
    return ControlUnit(
        arg_index=index,
        model=_model(index, data.get("model")),
        module=_module(index, data.get("module")),
        image=_image(index, "image", image, max_pixels),
        mask=_image(index, "mask", mask, max_pixels),
        weight=_number(index, "weight", data.get("weight", 1.0), 0.0, 2.0),
        guidance_start=start,
        guidance_end=end,
        control_mode=_enum(index, "control_mode", data.get("control_mode", 0), ControlMode),
        resize_mode=_enum(index, "resize_mode", data.get("resize_mode", 1), ResizeMode, _LEGACY_RESIZE),
        pixel_perfect=_flag(index, "pixel_perfect", data.get("pixel_perfect", False)),
        processor_res=_number(index, "processor_res", data.get("processor_res", -1), -1),
        threshold_a=_number(index, "threshold_a", data.get("threshold_a", -1)),
        threshold_b=_number(index, "threshold_b", data.get("threshold_b", -1)),
        hr_option=_enum(index, "hr_option", data.get("hr_option", 0), HiresOption),
        save_detected_map=_flag(index, "save_detected_map", data.get("save_detected_map", True)),
        low_vram=bool(data.get("low_vram", False)),
    )


def find_script(alwayson_scripts: Mapping[str, Any]) -> tuple[str, Any] | None:
    """The controlnet entry under any capitalisation of its key (the extension's title is "ControlNet")."""
    for key, value in alwayson_scripts.items():
        if isinstance(key, str) and key.strip().lower() == SCRIPT_KEY:
            return key, value
    return None


def parse_indexed_units(alwayson_scripts: Mapping[str, Any], max_pixels: int | None = None
                        ) -> tuple[list[tuple[int, ControlUnit]], list[str]]:
    """The enabled units of ``alwayson_scripts`` in order with their ``args`` index (for messages naming the
    unit), and warnings for what is accepted but ignored. Raises ``InvalidRequestError`` naming the first bad
    field."""
    found = find_script(alwayson_scripts)
    if found is None:
        return [], []
    _, value = found
    args = value.get("args", []) if isinstance(value, Mapping) else None
    if not isinstance(args, list):
        raise InvalidRequestError(FIELD_PREFIX, f'`alwayson_scripts.controlnet` must be {{"args": [...]}} but is '
                                                f"{type(value).__name__}")
    units: list[tuple[int, ControlUnit]] = []
    warnings: list[str] = []
    for index, raw in enumerate(args):
        if not isinstance(raw, Mapping):
            raise InvalidRequestError(f"{FIELD_PREFIX}[{index}]", f"`{FIELD_PREFIX}[{index}]` must be an object "
                                                                   f"with unit fields but is {type(raw).__name__}")
        if not _flag(index, "enabled", raw.get("enabled", True)):
            continue
        units.append((index, parse_unit(index, raw, warnings, max_pixels)))
    return units, warnings


def parse_units(alwayson_scripts: Mapping[str, Any], max_pixels: int | None = None
                ) -> tuple[list[ControlUnit], list[str]]:
    """The enabled units of ``alwayson_scripts`` in order, and warnings for what is accepted but ignored."""
    units, warnings = parse_indexed_units(alwayson_scripts, max_pixels)
    return [unit for _, unit in units], warnings

