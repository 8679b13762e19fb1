"""Reading what users bring into kohya's dataset layout, before anything is stored.

A dataset is ``<repeats>_<name>/`` folders of images, each image with an optional same-name ``.txt``
caption (kohya's DreamBooth-style layout). Sources are uploaded files or the entries of a zip; both
become `SourceFile`s, and `plan` checks every one of them (paths, kinds, image headers, sizes, pairs)
so that a refusal names the file and leaves nothing behind: the service stores only a complete plan.

Layout rules (documented for users in the tab and the API):

* a file in a ``<N>_<name>`` folder keeps it (``N`` = repeats, a positive integer);
* a file at the top level goes to one folder ``<repeats>_<dataset name>`` (``repeats`` from the form);
* a single wrapper folder around everything (``train/10_cat/...``) is dropped;
* any other folder, or a deeper one, is refused with its name.

Zips: entries climbing out (``..``), absolute paths, drive letters, backslashes, symlinks and encrypted
entries are refused by name; the entry count and the total uncompressed size (as declared, and again as
read) are bounded, so a zip bomb is refused before it is inflated. ``__MACOSX/`` and ``.DS_Store`` /
``Thumbs.db`` (what desktop zip tools add) are skipped.
"""

from __future__ import annotations

import re
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO

from pipelines.images import open_image
from pipelines.types import InvalidRequestError
from webapp.services.errors import InvalidInput

IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "BMP": "image/bmp"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
MAX_CAPTION_BYTES = 64 * 1024
MAX_NAME = 100
MAX_REPEATS = 10_000
SKIPPED_FOLDERS = ("__MACOSX",)
SKIPPED_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")
FOLDER = re.compile(r"^(?P<repeats>\d+)_(?P<name>.+)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FORBIDDEN = '<>:"|?*\\/'


@dataclass(frozen=True)
class Limits:
    max_files: int
    max_total_bytes: int
    max_image_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class SourceFile:
    """A file as the user named it (a relative path) and how to read its bytes (read at most twice)."""

    name: str
    size: int
    load: Callable[[], bytes]


@dataclass(frozen=True)
class PlannedImage:
    folder: str
    repeats: int
    file_name: str
    source: SourceFile
    caption: str | None
    width: int
    height: int
    content_type: str

    @property
    def caption_name(self) -> str:
        return f"{PurePosixPath(self.file_name).stem}{CAPTION_EXTENSION}"

    @property
    def stored_bytes(self) -> int:
        return self.source.size + (len(self.caption.encode("utf-8")) if self.caption is not None else 0)


@dataclass
class Plan:
    images: list[PlannedImage] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(i.stored_bytes for i in self.images)


# -- names -----------------------------------------------------------------------------------------------

def check_dataset_name(name: str, *, field_name: str = "name") -> str:
    """A dataset name: also the ``<name>`` of its default folder, so no path characters."""
    cleaned = name.strip() if isinstance(name, str) else ""
    if not cleaned:
        raise InvalidInput(f"`{field_name}` must not be empty", field=field_name)
    if len(cleaned) > MAX_NAME:
        raise InvalidInput(f"`{field_name}` is {len(cleaned)} characters long; at most {MAX_NAME} are allowed",
                           field=field_name)
    if _CONTROL.search(cleaned) or any(c in _FORBIDDEN for c in cleaned) or cleaned.startswith("."):
        raise InvalidInput(f"`{field_name}` {cleaned!r} may not contain {_FORBIDDEN} or control characters, "
                           "nor start with '.'", field=field_name)
    return cleaned


def check_repeats(repeats: int | str, *, field_name: str = "repeats") -> int:
    try:
        value = int(repeats)
    except (TypeError, ValueError):
        raise InvalidInput(f"`{field_name}` must be a whole number but is {repeats!r}", field=field_name) from None
    if not 1 <= value <= MAX_REPEATS:
        raise InvalidInput(f"`{field_name}` must be between 1 and {MAX_REPEATS} but is {value}", field=field_name)
    return value


def parse_folder(folder: str, *, field_name: str = "files") -> int:
    """The repeats of a kohya ``<N>_<name>`` folder; anything else is refused naming the folder."""
    match = FOLDER.match(folder)
    if match is None or not match["name"].strip():
        raise InvalidInput(f"folder {folder!r} is not kohya's `<repeats>_<name>` (such as `10_cat`); put the images "
                           "in such folders, or at the top level to use the form's repeats", field=field_name)
    repeats = int(match["repeats"])
    if not 1 <= repeats <= MAX_REPEATS:
        raise InvalidInput(f"folder {folder!r}: repeats must be between 1 and {MAX_REPEATS} but is {repeats}",
                           field=field_name)
    return repeats


def _parts(name: str, field_name: str) -> tuple[str, ...]:
    """The segments of a relative path a user gave, refusing anything that could leave the dataset."""
    if "\\" in name:
        raise InvalidInput(f"{name!r} uses backslashes; zip and upload paths must use '/'", field=field_name)
    if _CONTROL.search(name):
        raise InvalidInput(f"{name!r} contains control characters", field=field_name)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise InvalidInput(f"{name!r} is an absolute path; only relative paths are accepted", field=field_name)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise InvalidInput(f"{name!r} climbs out of the dataset ('..'); refused", field=field_name)
    if not parts:
        raise InvalidInput(f"{name!r} names no file", field=field_name)
    return parts


def _skipped(parts: tuple[str, ...]) -> bool:
    return parts[0] in SKIPPED_FOLDERS or parts[-1] in SKIPPED_FILES


# -- sources ----------------------------------------------------------------------------------------------

def uploaded(files: list[tuple[str, bytes]]) -> list[SourceFile]:
    """Uploaded files as sources (``name`` may carry a ``<N>_<name>/`` folder)."""
    return [SourceFile(name=name, size=len(data), load=lambda data=data: data) for name, data in files]


def zip_sources(fileobj: IO[bytes], limits: Limits, *, field_name: str = "zip") -> list[SourceFile]:
    """The file entries of a zip, every entry checked from the central directory before one is inflated."""
    try:
        archive = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidInput(f"the zip cannot be read ({exc})", field=field_name) from None
    infos = archive.infolist()
    if len(infos) > limits.max_files * 2 + 64:  # folders and skipped junk count too, within reason
        raise InvalidInput(f"the zip has {len(infos)} entries; at most {limits.max_files} files are allowed",
                           field=field_name)
    sources: list[SourceFile] = []
    declared = 0
    for info in infos:
        parts = _parts(info.filename, field_name)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise InvalidInput(f"{info.filename!r} is a symbolic link; links are refused", field=field_name)
        if info.flag_bits & 0x1:
            raise InvalidInput(f"{info.filename!r} is encrypted; encrypted zips are refused", field=field_name)
        if info.is_dir() or _skipped(parts):
            continue
        declared += info.file_size
        if declared > limits.max_total_bytes:
            raise InvalidInput(f"the zip inflates to more than {limits.max_total_bytes // 2**20} MB "
                               f"(reached at {info.filename!r}); refused", field=field_name)
        sources.append(SourceFile(name="/".join(parts), size=info.file_size,
                                  load=lambda info=info: _read_entry(archive, info, field_name)))
    return sources


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, field_name: str) -> bytes:
    """The entry's bytes, never more than it declared (a lying header is caught here, and by the CRC)."""
    try:
        with archive.open(info) as handle:
            data = handle.read(info.file_size + 1)
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, EOFError) as exc:
        raise InvalidInput(f"{info.filename!r} cannot be read from the zip ({exc})", field=field_name) from None
    if len(data) != info.file_size:
        raise InvalidInput(f"{info.filename!r} does not hold the {info.file_size} bytes its header declares",
                           field=field_name)
    return data


# -- the plan ---------------------------------------------------------------------------------------------

def plan(sources: list[SourceFile], *, dataset_name: str, repeats: int, limits: Limits,
         captions: dict[str, str] | None = None, field_name: str = "files") -> Plan:
    """Check every source and pair images with captions; raise `InvalidInput` naming the first bad file.

    ``captions`` (image file name or relative path → text) captions images that came without a ``.txt``.
    """
    named = [(s, _parts(s.name, field_name)) for s in sources]
    named = [(s, p) for s, p in named if not _skipped(p)]
    if not named:
        raise InvalidInput("no files were given", field=field_name)
    if len(named) > limits.max_files:
        raise InvalidInput(f"{len(named)} files were given; at most {limits.max_files} are allowed", field=field_name)
    if sum(s.size for s, _ in named) > limits.max_total_bytes:
        raise InvalidInput(f"the files add up to more than {limits.max_total_bytes // 2**20} MB", field=field_name)
    wrappers = {p[0] for _, p in named if len(p) > 1}
    if len(wrappers) == 1 and all(len(p) > 1 for _, p in named) and not FOLDER.match(next(iter(wrappers))):
        named = [(s, p[1:]) for s, p in named]  # one wrapper folder around everything (train/10_cat/...)
    default_folder = f"{repeats}_{dataset_name}"
    images: dict[tuple[str, str], tuple[SourceFile, int]] = {}
    texts: dict[tuple[str, str], SourceFile] = {}
    for source, parts in named:
        if len(parts) > 2:
            raise InvalidInput(f"{source.name!r} is nested too deep: a dataset holds `<repeats>_<name>/<file>` only",
                               field=field_name)
        folder, file_name = (parts[0], parts[1]) if len(parts) == 2 else (default_folder, parts[0])
        folder_repeats = parse_folder(folder, field_name=field_name) if len(parts) == 2 else repeats
        suffix = PurePosixPath(file_name).suffix.lower()
        stem_key = (folder, PurePosixPath(file_name).stem)
        if suffix == CAPTION_EXTENSION:
            texts[stem_key] = source
        elif suffix in IMAGE_EXTENSIONS:
            if stem_key in images:
                other = images[stem_key][0].name
                raise InvalidInput(f"{source.name!r} and {other!r} would share one caption file; rename one",
                                   field=field_name)
            images[stem_key] = (source, folder_repeats)
        else:
            raise InvalidInput(f"{source.name!r} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a caption "
                               f"({CAPTION_EXTENSION}); refused", field=field_name)
    if not images:
        raise InvalidInput("no images were given (only captions or skipped files)", field=field_name)
    given = {k.strip("/"): v for k, v in (captions or {}).items()}
    result = Plan()
    missing: list[str] = []
    for (folder, stem), (source, folder_repeats) in sorted(images.items()):
        file_name = PurePosixPath(source.name).name
        width, height, content_type = check_image(source, limits, field_name=field_name)
        caption_source = texts.pop((folder, stem), None)
        if caption_source is not None:
            caption: str | None = read_caption(caption_source, field_name=field_name)
        else:
            caption = given.get(f"{folder}/{file_name}", given.get(file_name, given.get(source.name)))
        if caption is not None:
            caption = check_caption(caption, what=source.name)
        else:
            missing.append(f"{folder}/{file_name}")
        result.images.append(PlannedImage(folder=folder, repeats=folder_repeats, file_name=file_name, source=source,
                                          caption=caption, width=width, height=height, content_type=content_type))
    if missing:
        result.warnings.append(f"{len(missing)} image(s) have no caption: {', '.join(missing[:20])}"
                               + (" …" if len(missing) > 20 else ""))
    if texts:
        orphans = sorted(s.name for s in texts.values())
        result.warnings.append(f"{len(orphans)} caption(s) have no image and were skipped: {', '.join(orphans[:20])}")
    return result


def check_image(source: SourceFile, limits: Limits, *, field_name: str) -> tuple[int, int, str]:
    """Width, height and content type, from the header first (bombs refused before decoding), then verified."""
    if source.size > limits.max_image_bytes:
        raise InvalidInput(f"{source.name!r} is {source.size} bytes; an image may have at most "
                           f"{limits.max_image_bytes // 2**20} MB", field=field_name)
    data = source.load()
    try:
        with open_image(data, source.name, limits.max_pixels) as image:
            kind, (width, height) = image.format, image.size
            if kind not in IMAGE_TYPES:
                raise InvalidInput(f"{source.name!r} is a {kind} image; datasets take {', '.join(IMAGE_TYPES)}",
                                   field=field_name)
            image.verify()
    except InvalidRequestError as exc:
        raise InvalidInput(str(exc), field=field_name) from None  # open_image's message names the file
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"{source.name!r} is not a readable image ({exc})", field=field_name) from None
    return width, height, IMAGE_TYPES[kind]


def read_caption(source: SourceFile, *, field_name: str) -> str:
    if source.size > MAX_CAPTION_BYTES:
        raise InvalidInput(f"caption {source.name!r} is larger than {MAX_CAPTION_BYTES // 1024} KB", field=field_name)
    try:
        return source.load().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidInput(f"caption {source.name!r} is not UTF-8 text", field=field_name) from None


def check_caption(caption: str, *, what: str, field_name: str = "caption") -> str:
    """A caption as kohya reads it: one text, kept as given apart from surrounding whitespace."""
    if not isinstance(caption, str):
        raise InvalidInput(f"the caption of {what!r} must be text", field=field_name)
    cleaned = caption.strip()
    if len(cleaned.encode("utf-8")) > MAX_CAPTION_BYTES:
        raise InvalidInput(f"the caption of {what!r} is larger than {MAX_CAPTION_BYTES // 1024} KB", field=field_name)
    if "\x00" in cleaned:
        raise InvalidInput(f"the caption of {what!r} contains NUL", field=field_name)
    return cleaned
