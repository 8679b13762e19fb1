"""A1111 infotext ("parameters"): write it, embed it in PNG/JPEG/WebP, read it back, parse it (a1111-api.md §7).

The text is the de-facto exchange format for generation settings: Civitai, image browsers and A1111's
own PNG Info tab read it, so the writer follows A1111's key order and quoting exactly, and the parser
follows A1111's rules (last line holds the parameters only if it has ≥ 3 ``Key: value`` pairs,
``WxH`` values split into ``Key-1``/``Key-2``, defaults for missing keys, legacy ``Hypernet``).
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

STUDIO_VERSION = "0.1.0"
VERSION = f"studio {STUDIO_VERSION}"

# A1111's parameter pattern (modules/infotext_utils.py ``re_param_code``) with the key's length bounded:
# unbounded, a long line without a colon backtracks quadratically (20,000 characters took 4 s).
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]{0,63}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_USER_COMMENT = 0x9286
_EXIF_IFD = 0x8769
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")

# A1111's key order for the fixed part of the parameters line; extra parameters follow in insertion order.
KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight",
    "Clip skip", "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)
TRAILING_KEYS = ("Version", "User")


def format_number(value: float | int) -> str:
    """Integral floats print as integers ("CFG scale: 7"), others as Python prints them."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quote(text: Any) -> str:
    """A1111 quoting: JSON-encode a value containing ``,``, ``:`` or a newline."""
    text = format_number(text) if isinstance(text, int | float) and not isinstance(text, bool) else str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """The full infotext: prompt, optional ``Negative prompt:`` line, parameters line; stripped.

    ``params`` may be in any order: the fixed keys are sorted into A1111's order, other keys keep their
    insertion order after them, ``Version``/``User`` go last. ``None`` values are skipped; a value equal
    to its key is written as the bare key.
    """
    fixed = [k for k in KEY_ORDER if k in params]
    extra = [k for k in params if k not in KEY_ORDER and k not in TRAILING_KEYS]
    trailing = [k for k in TRAILING_KEYS if k in params]
    pairs = []
    for key in fixed + extra + trailing:
        value = params[key]
        if value is None:
            continue
        pairs.append(key if value == key else f"{key}: {quote(value)}")
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(pairs)}".strip()


def parse(text: str) -> dict[str, Any]:
    """Parse an infotext into A1111's ``/png-info`` ``parameters`` dict (string values, A1111 defaults)."""
    from pipelines import samplers

    *lines, last = text.strip().split("\n")
    if len(_PARAM_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    res: dict[str, Any] = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _PARAM_RE.findall(last):
        value = unquote(value.strip()) if value.strip().startswith('"') else value.strip()
        m = _SIZE_RE.match(value)
        if m:
            res[f"{key}-1"], res[f"{key}-2"] = m.group(1), m.group(2)
        else:
            res[key] = value
    defaults: dict[str, Any] = {
        "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
        "Hires schedule type": "Use same scheduler", "Hires checkpoint": "Use same checkpoint",
        "Hires prompt": "", "Hires negative prompt": "", "Mask mode": "Inpaint masked",
        "Masked content": "original", "Inpaint area": "Whole picture", "Masked area padding": 32,
        "RNG": "GPU", "Schedule type": "Automatic", "VAE Encoder": "Full", "VAE Decoder": "Full",
        "FP8 weight": "Disable",
    }
    if "Hypernet" in res:
        res["Prompt"] += f"<hypernet:{res['Hypernet']}:{res.get('Hypernet strength', '1.0')}>"
    if "Sampler" in res and "Schedule type" not in res:
        try:  # legacy combined names ("DPM++ 2M Karras") carry the schedule type
            resolved = samplers.resolve(res["Sampler"], None)
        except ValueError:
            logger.debug("infotext sampler %r not known here; kept as written", res["Sampler"])
        else:
            if resolved.schedule.name != "automatic":
                res["Sampler"], res["Schedule type"] = resolved.name, resolved.schedule.label
    for key, value in defaults.items():
        res.setdefault(key, value)
    return res


def _int(value: Any) -> int:
    return int(float(value))


def refiner_refs(parsed: Mapping[str, Any]) -> list[str]:
    """What names the refiner in ``Refiner: name [hash]``: the hash first (exact), then the name."""
    value = str(parsed.get("Refiner") or "").strip()
    if not value:
        return []
    match = re.fullmatch(r"(.*?)\s*\[([0-9a-fA-F]{8,64})\]", value)
    return [match.group(2), match.group(1)] if match else [value]


def request_fields(parsed: Mapping[str, Any]) -> dict[str, Any]:
    """Map a parsed infotext onto ``GenerationRequest`` field names and types (only what it states).

    Keys that do not describe the request (Model, Model hash, VAE, Version, Lora hashes...) are left to
    the caller, who resolves models by name/hash.
    """
    out: dict[str, Any] = {"prompt": parsed.get("Prompt", ""), "negative_prompt": parsed.get("Negative prompt", "")}
    simple = {
        "Steps": ("steps", _int), "Sampler": ("sampler_name", str), "CFG scale": ("cfg_scale", float),
        "Seed": ("seed", _int), "Size-1": ("width", _int), "Size-2": ("height", _int),
        "Clip skip": ("clip_skip", _int), "Denoising strength": ("denoising_strength", float),
        "Variation seed": ("subseed", _int), "Variation seed strength": ("subseed_strength", float),
        "Seed resize from-1": ("seed_resize_from_w", _int), "Seed resize from-2": ("seed_resize_from_h", _int),
        "Hires steps": ("hr_second_pass_steps", _int), "Hires upscaler": ("hr_upscaler", str),
        "Mask blur": ("mask_blur", _int), "Mask blur x": ("mask_blur_x", _int), "Mask blur y": ("mask_blur_y", _int),
        "Eta": ("eta", float), "Eta DDIM": ("eta", float), "Refiner switch at": ("refiner_switch_at", float),
        "Hires prompt": ("hr_prompt", str), "Hires negative prompt": ("hr_negative_prompt", str),
    }
    for key, (name, cast) in simple.items():
        if key in parsed and parsed[key] not in (None, ""):
            try:
                out[name] = cast(parsed[key])
            except ValueError:
                logger.info("infotext %s value %r is not a %s; ignored", key, parsed[key], cast.__name__)
    if parsed.get("Schedule type") not in (None, "", "Automatic"):
        out["scheduler"] = parsed["Schedule type"]
    if parsed.get("Hires sampler") not in (None, "", "Use same sampler"):
        out["hr_sampler_name"] = parsed["Hires sampler"]
    if parsed.get("Hires schedule type") not in (None, "", "Use same scheduler"):
        out["hr_scheduler"] = parsed["Hires schedule type"]
    hires_resize = (_int(parsed.get("Hires resize-1", 0)), _int(parsed.get("Hires resize-2", 0)))
    if "Hires upscale" in parsed or any(hires_resize) or "Hires upscaler" in parsed:
        out["enable_hr"] = True
        if "Hires upscale" in parsed:
            out["hr_scale"] = float(parsed["Hires upscale"])
        if any(hires_resize):
            out["hr_resize_x"], out["hr_resize_y"] = hires_resize
    if "Mask blur" in parsed or "Mask blur x" in parsed:  # A1111 writes it for every inpaint job
        content = str(parsed.get("Masked content", "original"))
        if content in MASKED_CONTENT:
            out["inpainting_fill"] = MASKED_CONTENT.index(content)
        out["inpaint_full_res"] = parsed.get("Inpaint area") == "Only masked"
        out["inpaint_full_res_padding"] = _int(parsed.get("Masked area padding", 32))
        out["inpainting_mask_invert"] = 1 if parsed.get("Mask mode") == "Inpaint not masked" else 0
    return out


# -- embedding in image files -------------------------------------------------------------------

def encode_image(image, text: str | None, fmt: str = "png", *, quality: int = 95) -> bytes:
    """Encode a PIL image as PNG (``parameters`` text chunk) or JPEG/WebP (EXIF UserComment, UTF-16)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    fmt = fmt.lower()
    buf = io.BytesIO()
    if fmt == "png":
        info = PngInfo()
        if text is not None:
            info.add_text("parameters", text)  # tEXt, or iTXt when not latin-1
        image.save(buf, format="PNG", pnginfo=info, compress_level=4)
    elif fmt in ("jpeg", "jpg", "webp"):
        exif = Image.Exif()
        if text is not None:
            exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE_PREFIX + text.encode("utf-16-be")
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.save(buf, format="JPEG" if fmt in ("jpeg", "jpg") else "WEBP", exif=exif.tobytes(), quality=quality)
    else:
        raise ValueError(f"unsupported image format {fmt!r}; use png, jpeg or webp")
    return buf.getvalue()


def _decode_user_comment(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    prefix, body = raw[:8], raw[8:]
    if prefix == _UNICODE_PREFIX:
        # Big-endian per piexif/A1111; some writers use little-endian: pick the one without NUL-odd bytes.
        if len(body) >= 2 and body[0] != 0 and body[1] == 0:
            return body.decode("utf-16-le", errors="replace")
        return body.decode("utf-16-be", errors="replace")
    if prefix == _ASCII_PREFIX or prefix == b"\x00" * 8:
        return body.decode("utf-8", errors="replace").rstrip("\x00")
    return raw.decode("utf-8", errors="replace").rstrip("\x00")


def read_infotext(data: bytes, field_name: str = "image") -> str | None:
    """The infotext stored in an encoded image (PNG ``parameters`` chunk or EXIF UserComment), if any.

    Unreadable data and decompression bombs raise ``InvalidRequestError`` naming ``field_name``."""
    from pipelines.images import open_image

    with open_image(data, field_name) as image:
        text = image.info.get("parameters")
        if isinstance(text, str):
            return text
        raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
        if raw:
            return _decode_user_comment(raw)
        comment = image.info.get("comment")
        if isinstance(comment, bytes):
            return comment.decode("utf-8", errors="replace")
        return comment if isinstance(comment, str) else None
