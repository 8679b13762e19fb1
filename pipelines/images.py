"""Image helpers with A1111 semantics: decoding request images and the img2img resize modes.

Every image a client sends (init images, masks, png-info) is opened here, by ``open_image``: the header
is read first and the pixel count checked against the caller's limit and PIL's decompression-bomb limit
before a single pixel is decoded, so a few kilobytes declaring 30000x30000 pixels cost nothing.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, ImageOps

from pipelines.types import InvalidRequestError

LANCZOS = Image.Resampling.LANCZOS
UNREADABLE = (OSError, ValueError, SyntaxError)
"""What PIL raises for garbage and truncated data (UnidentifiedImageError is an OSError)."""


@contextmanager
def open_image(data: bytes, field_name: str, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """The image in ``data`` opened lazily (header only), refused with ``InvalidRequestError`` naming
    ``field_name`` when it is unreadable, a decompression bomb, or larger than ``max_pixels``.

    PIL's DecompressionBombWarning (over ``Image.MAX_IMAGE_PIXELS``) is treated as the error it warns of.
    """
    if not isinstance(data, bytes | bytearray):
        raise InvalidRequestError(field_name, f"`{field_name}` must be encoded image bytes but is {type(data).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequestError(field_name, f"`{field_name}` is too large to decode safely ({exc})") from None
    except UNREADABLE as exc:
        raise InvalidRequestError(field_name, f"`{field_name}` is not a readable image ({exc})") from None
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise InvalidRequestError(field_name, f"`{field_name}` is {width}x{height} = {width * height:,} pixels, "
                                                  f"more than the {max_pixels:,} pixels a job may use")
        yield image


def image_size(data: bytes, field_name: str, max_pixels: int | None = None) -> tuple[int, int]:
    """Width and height from the header alone (``open_image``'s checks included)."""
    with open_image(data, field_name, max_pixels) as image:
        return image.size


def decode_image(data: bytes, field_name: str, mode: str = "RGB") -> Image.Image:
    """Encoded bytes → PIL image in ``mode`` (EXIF orientation applied, alpha flattened onto black)."""
    with open_image(data, field_name) as raw:
        try:
            image = ImageOps.exif_transpose(raw)
            image.load()
        except UNREADABLE as exc:
            raise InvalidRequestError(field_name, f"`{field_name}` is not a readable image ({exc})") from None
    if mode == "L" and image.mode in ("RGBA", "LA", "PA"):
        # A1111 masks: white = repaint; a transparent PNG mask means its alpha.
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            return rgba.getchannel("A")
    return image.convert(mode)


def resize_image(mode: int, image: Image.Image, width: int, height: int,
                 resample: Image.Resampling = LANCZOS) -> Image.Image:
    """A1111 resize modes: 0 just resize, 1 crop and resize, 2 resize and fill (3 is handled in latent space).

    Mode 1 scales to cover the target and crops the overflow centred; mode 2 scales to fit inside and
    fills the bands by stretching the image's outermost rows/columns.
    """
    if mode in (0, 3) or image.size == (width, height):
        return image.resize((width, height), resample)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        if ratio > src_ratio:
            new_w, new_h = width, max(1, round(image.height * width / image.width))
        else:
            new_w, new_h = max(1, round(image.width * height / image.height)), height
        resized = image.resize((new_w, new_h), resample)
        canvas = Image.new(image.mode, (width, height))
        canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))
        return canvas
    if mode != 2:
        raise InvalidRequestError("resize_mode", f"`resize_mode` must be between 0 and 3 but is {mode}")
    if ratio < src_ratio:
        new_w, new_h = width, max(1, round(image.height * width / image.width))
    else:
        new_w, new_h = max(1, round(image.width * height / image.height)), height
    resized = image.resize((new_w, new_h), resample)
    canvas = Image.new(image.mode, (width, height))
    left, top = (width - new_w) // 2, (height - new_h) // 2
    canvas.paste(resized, (left, top))
    if new_h < height:
        if top > 0:
            canvas.paste(resized.crop((0, 0, new_w, 1)).resize((new_w, top)), (left, 0))
        bottom = height - top - new_h
        if bottom > 0:
            canvas.paste(resized.crop((0, new_h - 1, new_w, new_h)).resize((new_w, bottom)), (left, top + new_h))
    if new_w < width:
        if left > 0:
            canvas.paste(resized.crop((0, 0, 1, new_h)).resize((left, new_h)), (0, top))
        right = width - left - new_w
        if right > 0:
            canvas.paste(resized.crop((new_w - 1, 0, new_w, new_h)).resize((right, new_h)), (left + new_w, top))
    return canvas
