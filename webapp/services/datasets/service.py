"""`DatasetService`: training datasets in the asset store, in kohya's layout, with owner + visibility.

Stored under ``datasets/<id>/<N_name>/<image>`` with the same-name ``.txt`` caption beside each captioned
image, so the folder (a local path or an ``s3://`` URI, shown as ``location``) can be handed to kohya's
scripts as it is; the rows (`Dataset`, `DatasetItem`) index it for paged browsing, caption edits and the
trainer. Rules as for models: users see their own datasets and shared ones (admins: all); owners and
administrators change and delete them; anyone who can see a dataset may resize it into a new one of
their own. Every dataset's bytes count against its owner's disk quota.

Nothing half-made is left: sources are checked in full first (`layout.plan`), blobs are stored next and
removed again if storing or recording fails.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO

from PIL import Image
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from deploy.storage import BlobStore
from deploy.storage.base import StorageError
from pipelines.images import decode_image, resize_image
from pipelines.types import InvalidRequestError
from webapp.db import Database
from webapp.records import Dataset, DatasetItem, User, Visibility, new_id, utcnow
from webapp.services import sharing
from webapp.services.access import authorize, can, visible
from webapp.services.datasets import layout
from webapp.services.datasets.layout import Limits, Plan, PlannedImage, SourceFile
from webapp.services.errors import Conflict, InvalidInput, NotFound, PermissionDenied, Unavailable
from webapp.services.quota import DiskQuota
from webapp.services.users import usernames

log = logging.getLogger(__name__)

PREFIX = "datasets"
RESIZE_MODES = {"crop": 1, "fit": 2, "stretch": 0}
"""crop: cover the resolution and crop the overflow centred; fit: fit inside and fill the bands; stretch."""
MIN_SIDE, MAX_SIDE = 64, 4096


@dataclass(frozen=True)
class Created:
    dataset: Dataset
    warnings: list[str] = field(default_factory=list)


def can_see(actor: User, dataset: Dataset) -> bool:
    return can(actor, "dataset:list", dataset)


def require_manage(actor: User, dataset: Dataset, action: str = "update") -> None:
    if can(actor, f"dataset:{action}", dataset):
        return
    if f"dataset:{action}" not in actor.permissions:
        authorize(actor, f"dataset:{action}")
    raise PermissionDenied(f"only the owner of dataset {dataset.name!r} or a holder of dataset:all may change it",
                           field="dataset_id")


class DatasetService:
    def __init__(self, db: Database, store: BlobStore, quota: DiskQuota, limits: Limits) -> None:
        self._db = db
        self._store = store
        self._quota = quota
        self.limits = limits

    # -- creating -----------------------------------------------------------------------------------------

    def create(
        self, *, actor: User, name: str, files: list[tuple[str, bytes]] | list[SourceFile], repeats: int | str = 1,
        visibility: Visibility | str = Visibility.PRIVATE, captions: dict[str, str] | None = None,
        allowed_roles: Sequence[str | int] | None = None,
    ) -> Created:
        """A dataset from uploaded files: images (optionally in ``<N>_<name>/`` folders) and ``.txt`` captions,
        and/or ``captions`` by image file name (``dataset:create``)."""
        authorize(actor, "dataset:create")
        sources = [f if isinstance(f, SourceFile) else layout.uploaded([f])[0] for f in files]
        return self._create(actor=actor, name=name, sources=sources, repeats=repeats, visibility=visibility,
                            allowed_roles=allowed_roles, captions=captions, source="upload", field_name="files")

    def create_from_zip(
        self, *, actor: User, name: str, zip_file: IO[bytes], repeats: int | str = 1,
        visibility: Visibility | str = Visibility.PRIVATE, allowed_roles: Sequence[str | int] | None = None,
    ) -> Created:
        """A dataset from a zip (a seekable file object) in kohya's layout; see `layout` for the rules
        (``dataset:create``)."""
        authorize(actor, "dataset:create")
        self._check_new(actor, name)
        self._sharing(visibility, allowed_roles)  # bad sharing is refused before the zip is read
        sources = layout.zip_sources(zip_file, self.limits)
        return self._create(actor=actor, name=name, sources=sources, repeats=repeats, visibility=visibility,
                            allowed_roles=allowed_roles, captions=None, source="zip", field_name="zip")

    def _check_new(self, actor: User, name: str) -> str:
        cleaned = layout.check_dataset_name(name)
        with self._db.read() as s:
            if s.exec(select(Dataset.id).where(Dataset.owner_id == actor.id, Dataset.name == cleaned)).first():
                raise Conflict(f"you already have a dataset named {cleaned!r}", field="name")
        self._quota.check(actor, what="a new dataset")
        return cleaned

    def _sharing(self, visibility: Visibility | str | None, allowed_roles: Sequence[str | int] | None,
                 current: tuple[Visibility, str] | None = None) -> tuple[Visibility, str]:
        """Visibility and stored allowed roles (``webapp.services.sharing``); datasets are private by default."""
        with self._db.read() as s:
            return sharing.resolve(s, visibility=visibility, allowed_roles=allowed_roles, current=current,
                                   default=Visibility.PRIVATE)

    def _create(self, *, actor: User, name: str, sources: list[SourceFile], repeats: int | str,
                visibility: Visibility | str, allowed_roles: Sequence[str | int] | None,
                captions: dict[str, str] | None, source: str, field_name: str) -> Created:
        cleaned = self._check_new(actor, name)
        count = layout.check_repeats(repeats)
        wanted = self._sharing(visibility, allowed_roles)
        found = layout.plan(sources, dataset_name=cleaned, repeats=count, limits=self.limits, captions=captions,
                            field_name=field_name)
        self._quota.check(actor, adding=found.total_bytes, what="the dataset")
        dataset_id = new_id()
        with self._storing() as keys:
            for image in found.images:
                self._put_image(dataset_id, image, image.source.load(), keys)
            dataset = self._record(actor, dataset_id, cleaned, wanted, found, source=source)
        log.info("dataset %s (%r, %d images) created by %s", dataset.id, dataset.name, dataset.image_count,
                 actor.username)
        return Created(dataset, found.warnings)

    @contextmanager
    def _storing(self) -> Iterator[list[str]]:
        """Collects the keys stored inside the block; any failure removes them all again."""
        keys: list[str] = []
        try:
            yield keys
        except BaseException:
            for key in keys:
                try:
                    self._store.delete(key)
                except StorageError:
                    log.warning("could not remove %s after a failed dataset write", key)
            raise

    def _put_image(self, dataset_id: str, image: PlannedImage, data: bytes, keys: list[str]) -> None:
        base = f"{PREFIX}/{dataset_id}/{image.folder}"
        try:
            self._store.put(f"{base}/{image.file_name}", io.BytesIO(data), content_type=image.content_type)
            keys.append(f"{base}/{image.file_name}")
            if image.caption is not None:
                self._store.put(f"{base}/{image.caption_name}", io.BytesIO(image.caption.encode("utf-8")),
                                content_type="text/plain; charset=utf-8")
                keys.append(f"{base}/{image.caption_name}")
        except StorageError as exc:
            raise Unavailable(f"the asset store refused {image.folder}/{image.file_name}: {exc}") from exc

    def _record(self, actor: User, dataset_id: str, name: str, sharing_: tuple[Visibility, str], found: Plan, *,
                source: str, source_detail: str | None = None) -> Dataset:
        widths = [i.width for i in found.images]
        heights = [i.height for i in found.images]
        dataset = Dataset(id=dataset_id, name=name, owner_id=actor.id, visibility=sharing_[0],
                          allowed_roles=sharing_[1],
                          image_count=len(found.images), bytes=found.total_bytes, min_width=min(widths),
                          max_width=max(widths), min_height=min(heights), max_height=max(heights), source=source,
                          source_detail=source_detail)
        try:
            with self._db.write() as s:
                s.add(dataset)
                s.flush()
                for image in found.images:
                    s.add(DatasetItem(dataset_id=dataset_id, folder=image.folder, repeats=image.repeats,
                                      file_name=image.file_name, caption=image.caption, width=image.width,
                                      height=image.height, size=image.stored_bytes, content_type=image.content_type))
        except IntegrityError:
            raise Conflict(f"you already have a dataset named {name!r}", field="name") from None
        return dataset

    # -- reading ------------------------------------------------------------------------------------------

    def list_datasets(self, *, actor: User, limit: int | None = None, offset: int = 0) -> list[Dataset]:
        if offset < 0:
            raise InvalidInput("`offset` must be >= 0", field="offset")
        statement = self._visible(select(Dataset), actor).order_by(func.lower(Dataset.name), col(Dataset.created_at))
        statement = statement.offset(offset).limit(limit) if limit is not None else statement.offset(offset)
        with self._db.read() as s:
            return list(s.exec(statement))

    def count_datasets(self, *, actor: User) -> int:
        with self._db.read() as s:
            return s.exec(self._visible(select(func.count()).select_from(Dataset), actor)).one()

    @staticmethod
    def _visible(statement, actor: User):  # noqa: ANN001, ANN205 - a SQLModel select
        return statement.where(visible(actor, Dataset, "dataset"))

    def owner_names(self, datasets: list[Dataset]) -> dict[int, str]:
        return usernames(self._db, (d.owner_id for d in datasets))

    def role_names(self) -> dict[int, str]:
        """Id → name of every role: labels for datasets' allowed roles and the choices for sharing."""
        return sharing.role_names(self._db)

    def get(self, *, actor: User, dataset_id: str) -> Dataset:
        with self._db.read() as s:
            dataset = s.get(Dataset, dataset_id)
        if dataset is None or not can_see(actor, dataset):
            raise NotFound(f"no dataset with id {dataset_id!r}", field="dataset_id")
        return dataset

    def items(self, *, actor: User, dataset_id: str, limit: int = 50, offset: int = 0) -> list[DatasetItem]:
        """A page of the dataset's images with their captions, by folder then file name."""
        if limit < 1 or offset < 0:
            raise InvalidInput("`limit` must be >= 1 and `offset` >= 0", field="limit" if limit < 1 else "offset")
        self.get(actor=actor, dataset_id=dataset_id)
        with self._db.read() as s:
            return list(s.exec(select(DatasetItem).where(DatasetItem.dataset_id == dataset_id)
                               .order_by(col(DatasetItem.folder), col(DatasetItem.file_name)).offset(offset).limit(limit)))

    def item(self, *, actor: User, dataset_id: str, item_id: str) -> DatasetItem:
        self.get(actor=actor, dataset_id=dataset_id)
        with self._db.read() as s:
            item = s.get(DatasetItem, item_id)
        if item is None or item.dataset_id != dataset_id:
            raise NotFound(f"dataset {dataset_id!r} has no image with id {item_id!r}", field="item_id")
        return item

    def image_bytes(self, *, actor: User, dataset_id: str, item_id: str) -> tuple[bytes, str]:
        item = self.item(actor=actor, dataset_id=dataset_id, item_id=item_id)
        return self._read(self.key(item)), item.content_type

    def key(self, item: DatasetItem) -> str:
        return f"{PREFIX}/{item.dataset_id}/{item.folder}/{item.file_name}"

    def _read(self, key: str) -> bytes:
        try:
            with self._store.open(key) as handle:
                return handle.read()
        except StorageError as exc:
            raise Unavailable(f"the asset store cannot read {key}: {exc}") from exc

    def location(self, dataset: Dataset, *, actor: User) -> str:
        """Where the files are, to copy: for administrators a local folder, an ``s3://`` URI, or the store and
        prefix; for everyone else the place inside the asset store (server paths and buckets are the
        administrators' to see)."""
        prefix = f"{PREFIX}/{dataset.id}/"
        if not actor.is_admin:
            return f"asset store: {prefix}"
        root = getattr(self._store, "root", None)
        if root is not None:
            return str(root / PREFIX / dataset.id) + "/"
        bucket = getattr(self._store, "bucket", None)
        if bucket is not None:
            store_prefix = getattr(self._store, "prefix", "")
            return f"s3://{bucket}/{store_prefix + '/' if store_prefix else ''}{prefix}"
        return f"{self._store!r}: {prefix}"

    # -- changing -----------------------------------------------------------------------------------------

    def set_caption(self, *, actor: User, dataset_id: str, item_id: str, caption: str) -> DatasetItem:
        """Replace an image's caption (an empty caption is an empty ``.txt``); owners and administrators."""
        dataset = self.get(actor=actor, dataset_id=dataset_id)
        require_manage(actor, dataset)
        item = self.item(actor=actor, dataset_id=dataset_id, item_id=item_id)
        text = layout.check_caption(caption, what=item.relative_path)
        caption_key = f"{PREFIX}/{dataset_id}/{item.folder}/{PurePosixPath(item.file_name).stem}.txt"
        try:
            self._store.put(caption_key, io.BytesIO(text.encode("utf-8")), content_type="text/plain; charset=utf-8")
        except StorageError as exc:
            raise Unavailable(f"the asset store refused the caption of {item.relative_path}: {exc}") from exc
        old = len(item.caption.encode("utf-8")) if item.caption is not None else 0
        change = len(text.encode("utf-8")) - old
        with self._db.write() as s:
            current = s.get(DatasetItem, item_id)
            row = s.get(Dataset, dataset_id)
            if current is None or row is None:
                raise NotFound(f"dataset {dataset_id!r} has no image with id {item_id!r}", field="item_id")
            current.caption, current.size = text, current.size + change
            row.bytes, row.updated_at = row.bytes + change, utcnow()
            s.add(current)
            s.add(row)
        return current

    def update(self, *, actor: User, dataset_id: str, name: str | None = None,
               visibility: Visibility | str | None = None,
               allowed_roles: Sequence[str | int] | None = None) -> Dataset:
        """Rename or share (``dataset:update`` on it: the owner, or ``dataset:all``); the stored folders keep their
        names (they are the dataset's layout). Sharing follows ``webapp.services.sharing``."""
        dataset = self.get(actor=actor, dataset_id=dataset_id)
        require_manage(actor, dataset, "update")
        try:
            with self._db.write() as s:
                row = s.get(Dataset, dataset_id)
                if row is None:
                    raise NotFound(f"no dataset with id {dataset_id!r}", field="dataset_id")
                if name is not None:
                    row.name = layout.check_dataset_name(name)
                if visibility is not None or allowed_roles is not None:
                    row.visibility, row.allowed_roles = sharing.resolve(
                        s, visibility=visibility, allowed_roles=allowed_roles,
                        current=(row.visibility, row.allowed_roles))
                row.updated_at = utcnow()
                s.add(row)
        except IntegrityError:
            raise Conflict(f"the owner already has a dataset named {name!r}", field="name") from None
        return row

    def delete(self, *, actor: User, dataset_id: str) -> None:
        """Delete the rows, then every blob under the dataset's prefix (``dataset:delete`` on it)."""
        dataset = self.get(actor=actor, dataset_id=dataset_id)
        require_manage(actor, dataset, "delete")
        with self._db.write() as s:
            for item in s.exec(select(DatasetItem).where(DatasetItem.dataset_id == dataset_id)):
                s.delete(item)
            row = s.get(Dataset, dataset_id)
            if row is not None:
                s.delete(row)
        for blob in list(self._store.list(f"{PREFIX}/{dataset_id}/")):
            self._store.delete(blob.key)
        log.info("dataset %s (%r) deleted by %s", dataset_id, dataset.name, actor.username)

    def resize(self, *, actor: User, dataset_id: str, width: int, height: int, mode: str = "crop",
               name: str | None = None, visibility: Visibility | str = Visibility.PRIVATE,
               allowed_roles: Sequence[str | int] | None = None) -> Created:
        """A NEW dataset of ``actor``'s with every image at ``width`` x ``height`` (captions and folders kept).

        JPEG images stay JPEG; the others become PNG (the file extension follows, the caption name does not
        change). The source is left as it is.
        """
        authorize(actor, "dataset:create")
        source = self.get(actor=actor, dataset_id=dataset_id)
        for value, label in ((width, "width"), (height, "height")):
            if not isinstance(value, int) or not MIN_SIDE <= value <= MAX_SIDE or value % 8:
                raise InvalidInput(f"`{label}` must be a multiple of 8 between {MIN_SIDE} and {MAX_SIDE} but is "
                                   f"{value!r}", field=label)
        if width * height > self.limits.max_pixels:
            raise InvalidInput(f"{width}x{height} is more than the {self.limits.max_pixels:,} pixels allowed",
                               field="width")
        if mode not in RESIZE_MODES:
            raise InvalidInput(f"`mode` must be one of {', '.join(RESIZE_MODES)} but is {mode!r}", field="mode")
        new_name = self._check_new(actor, name if name and name.strip() else f"{source.name} {width}x{height}")
        wanted = self._sharing(visibility, allowed_roles)
        with self._db.read() as s:
            items = list(s.exec(select(DatasetItem).where(DatasetItem.dataset_id == dataset_id)
                                .order_by(col(DatasetItem.folder), col(DatasetItem.file_name))))
        new_id_ = new_id()
        found = Plan()
        with self._storing() as keys:
            for item in items:
                jpeg = item.content_type == "image/jpeg"
                data = _render(self._read(self.key(item)), item.relative_path, RESIZE_MODES[mode], width, height,
                               jpeg=jpeg)
                file_name = item.file_name if jpeg else f"{PurePosixPath(item.file_name).stem}.png"
                planned = PlannedImage(folder=item.folder, repeats=item.repeats, file_name=file_name,
                                       source=SourceFile(name=item.relative_path, size=len(data),
                                                         load=lambda: b""),
                                       caption=item.caption, width=width, height=height,
                                       content_type="image/jpeg" if jpeg else "image/png")
                self._put_image(new_id_, planned, data, keys)
                found.images.append(planned)
            if not found.images:
                raise InvalidInput(f"dataset {source.name!r} has no images", field="dataset_id")
            self._quota.check(actor, adding=found.total_bytes, what="the resized dataset")
            created = self._record(actor, new_id_, new_name, wanted, found, source="resize",
                                   source_detail=f"{source.id} {mode} {width}x{height}")
        log.info("dataset %s resized to %dx%d (%s) as %s by %s", dataset_id, width, height, mode, new_id_,
                 actor.username)
        return Created(created, [])


def _render(data: bytes, what: str, mode: int, width: int, height: int, *, jpeg: bool) -> bytes:
    """The image resized by A1111's resize ``mode`` and encoded as JPEG (quality 95) or PNG."""
    try:
        image = decode_image(data, what)
    except InvalidRequestError as exc:
        raise InvalidInput(f"{what}: {exc}", field="dataset_id") from None
    out = io.BytesIO()
    resized = resize_image(mode, image, width, height, resample=Image.Resampling.LANCZOS)
    resized.save(out, format="JPEG" if jpeg else "PNG", **({"quality": 95} if jpeg else {}))
    return out.getvalue()
