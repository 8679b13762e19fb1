"""Reading a kohya-layout dataset folder and cutting it into aspect-ratio buckets and batches.

kohya's layout is what people already have: `<root>/<repeats>_<name>/` subfolders, each image with
an optional same-name caption file (`a.png` + `a.txt`). An image in a `10_cat` folder is seen ten
times per epoch. Images of different shapes are not squashed: each goes to the bucket (a width x
height with area at most resolution², sides multiples of bucket_reso_steps) whose aspect ratio is
closest to its own, is resized to cover it and centre-cropped, and a batch only holds images of one
bucket, so every tensor in a batch has one shape.

The batch order of an epoch depends only on (seed, epoch): a resumed run sees exactly the batches an
uninterrupted run would have.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps

from pipelines.images import LANCZOS, decode_image, open_image
from pipelines.types import InvalidRequestError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_SUBSET = re.compile(r"^(\d+)_(.+)$")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
MAX_IMAGE_PIXELS = 50_000_000


class DatasetError(ValueError):
    """The dataset folder is not usable; `path` is the folder or file at fault (relative to the root)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


@dataclass(frozen=True)
class ImageItem:
    """One image of the dataset, with what the folder says about it."""

    path: Path
    caption: str
    repeats: int
    subset: str  # the subfolder name, e.g. "10_cat"
    size: tuple[int, int]  # (width, height) as displayed (EXIF orientation applied)


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


def scan_folder(root: Path, caption_extension: str = ".txt") -> list[ImageItem]:
    """Every image under the kohya-layout `root`, sorted by path; DatasetError names what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder", str(root))
    items: list[ImageItem] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        _refuse_link(entry, entry.name)
        if entry.is_file():
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                raise DatasetError(f"image {entry.name} lies directly in the dataset folder; put images in "
                                   "subfolders named <repeats>_<name>, like 10_cat", entry.name)
            continue
        match = _SUBSET.match(entry.name)
        if not match:
            raise DatasetError(f"folder {entry.name} must be named <repeats>_<name>, like 10_{entry.name}",
                               entry.name)
        repeats = int(match.group(1))
        if not 1 <= repeats <= 10_000:
            raise DatasetError(f"folder {entry.name}: repeats must be 1 to 10000, got {repeats}", entry.name)
        items += _scan_subset(root, entry, repeats, caption_extension)
    if not items:
        raise DatasetError(f"dataset folder has no images ({', '.join(IMAGE_SUFFIXES)}) in <repeats>_<name> "
                           "subfolders", ".")
    return items


def _scan_subset(root: Path, folder: Path, repeats: int, caption_extension: str) -> list[ImageItem]:
    items = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        relative = path.relative_to(root).as_posix()
        _refuse_link(path, relative)
        caption_path = path.with_suffix(caption_extension)
        if caption_path.is_symlink():
            _refuse_link(caption_path, caption_path.relative_to(root).as_posix())
        try:
            caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else ""
        except UnicodeDecodeError:
            raise DatasetError(f"caption {caption_path.relative_to(root).as_posix()} is not UTF-8 text",
                               caption_path.relative_to(root).as_posix()) from None
        items.append(ImageItem(path=path, caption=" ".join(caption.split()), repeats=repeats,
                               subset=folder.name, size=_image_size(path, relative)))
    return items


def _refuse_link(path: Path, relative: str) -> None:
    # A dataset is data uploaded by a user: a link could make training read (and caption with) any server file.
    if path.is_symlink():
        raise DatasetError(f"{relative} is a symbolic link; datasets must hold plain files and folders", relative)


def _image_size(path: Path, relative: str) -> tuple[int, int]:
    try:
        with open_image(path.read_bytes(), relative, MAX_IMAGE_PIXELS) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in _ROTATED:
                width, height = height, width
    except InvalidRequestError as exc:
        raise DatasetError(str(exc).replace("`", ""), relative) from None
    return width, height


def make_buckets(resolution: tuple[int, int], min_reso: int, max_reso: int, step: int) -> list[Bucket]:
    """kohya's bucket set: for each side length, the largest other side within the area budget."""
    max_area = resolution[0] * resolution[1]
    sizes = {(resolution[0] // step * step, resolution[1] // step * step)}
    for width in range(min_reso // step * step or step, max_reso + 1, step):
        if width < min_reso:
            continue
        height = min(max_reso, max_area // width // step * step)
        if height >= min_reso:
            sizes.add((width, height))
            sizes.add((height, width))
    return [Bucket(w, h) for w, h in sorted(sizes)]


def nearest_bucket(size: tuple[int, int], buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to `size`'s (log ratio, so 2:1 and 1:2 are symmetric)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - aspect), -b.width * b.height, b.width))


def load_pixels(item: ImageItem, bucket: Bucket, *, flip: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image resized to cover `bucket` and centre-cropped: [3, H, W] in [-1, 1], and (top, left) of the crop."""
    relative = f"{item.subset}/{item.path.name}"
    try:
        image = decode_image(item.path.read_bytes(), relative, "RGB")
    except InvalidRequestError as exc:
        raise DatasetError(str(exc).replace("`", ""), relative) from None
    scale = max(bucket.width / image.width, bucket.height / image.height)
    resized = (max(bucket.width, round(image.width * scale)), max(bucket.height, round(image.height * scale)))
    if resized != image.size:
        image = image.resize(resized, LANCZOS)
    left = (image.width - bucket.width) // 2
    top = (image.height - bucket.height) // 2
    image = image.crop((left, top, left + bucket.width, top + bucket.height))
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)


@dataclass(frozen=True)
class Sample:
    """One entry of an epoch: an image index and its bucket (an image appears `repeats` times)."""

    index: int
    bucket: Bucket


class TrainingSet:
    """The scanned images with their buckets; cuts each epoch into single-bucket batches."""

    def __init__(self, items: list[ImageItem], buckets: list[Bucket]) -> None:
        self.items = items
        self.buckets = buckets
        self.item_buckets = [nearest_bucket(item.size, buckets) for item in items]

    @classmethod
    def from_folder(cls, root: Path, *, resolution: tuple[int, int], enable_bucket: bool, min_bucket_reso: int,
                    max_bucket_reso: int, bucket_reso_steps: int, caption_extension: str = ".txt") -> TrainingSet:
        items = scan_folder(root, caption_extension)
        if enable_bucket:
            buckets = make_buckets(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
        else:
            buckets = [Bucket(*resolution)]
        return cls(items, buckets)

    @property
    def num_images(self) -> int:
        """Images times repeats: what one epoch shows (kohya's ss_num_train_images)."""
        return sum(item.repeats for item in self.items)

    def bucket_counts(self) -> dict[Bucket, int]:
        counts: dict[Bucket, int] = {}
        for item, bucket in zip(self.items, self.item_buckets, strict=True):
            counts[bucket] = counts.get(bucket, 0) + item.repeats
        return counts

    def batches_per_epoch(self, batch_size: int) -> int:
        return sum(math.ceil(n / batch_size) for n in self.bucket_counts().values())

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[list[Sample]]:
        """The batches of `epoch` (0-based): shuffled within buckets, then the batch order shuffled."""
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        by_bucket: dict[Bucket, list[int]] = {}
        for index, (item, bucket) in enumerate(zip(self.items, self.item_buckets, strict=True)):
            by_bucket.setdefault(bucket, []).extend([index] * item.repeats)
        batches: list[list[Sample]] = []
        for bucket in sorted(by_bucket, key=lambda b: (b.width, b.height)):
            indices = by_bucket[bucket]
            order = torch.randperm(len(indices), generator=generator).tolist()
            shuffled = [indices[i] for i in order]
            for start in range(0, len(shuffled), batch_size):
                batches.append([Sample(i, bucket) for i in shuffled[start:start + batch_size]])
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Per subset folder, how often each comma-separated tag occurs (kohya's ss_tag_frequency)."""
        out: dict[str, dict[str, int]] = {}
        for item in self.items:
            tags = out.setdefault(item.subset, {})
            for tag in (t.strip() for t in item.caption.split(",")):
                if tag:
                    tags[tag] = tags.get(tag, 0) + 1
        return out

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """Per subset folder: repeats and image count (kohya's ss_dataset_dirs)."""
        out: dict[str, dict[str, int]] = {}
        for item in self.items:
            entry = out.setdefault(item.subset, {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return out


def shuffle_caption(caption: str, keep_tokens: int, generator: torch.Generator) -> str:
    """kohya's shuffle_caption: comma-separated tags shuffled, the first `keep_tokens` kept in place."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if len(tags) <= keep_tokens + 1:
        return caption
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join(kept + [rest[i] for i in order])


__all__ = ["Bucket", "DatasetError", "ImageItem", "Sample", "TrainingSet", "load_pixels", "make_buckets",
           "nearest_bucket", "scan_folder", "shuffle_caption"]
