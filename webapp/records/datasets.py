"""Training datasets in kohya's layout: a row per dataset and a row per image.

Per-image rows (rather than one manifest blob) because browsing is paged (``LIMIT/OFFSET`` on an index),
a caption edit is one row update that cannot race another edit of the same dataset, and the trainer
lists a dataset's images with their repeats folder without reading the asset store. The store holds the
same layout as files (``datasets/<id>/<N_name>/<image>`` and the same-name ``.txt``) so a dataset can
be copied out and given to kohya's scripts as it is.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, UniqueConstraint
from sqlmodel import Field, SQLModel

from webapp.records.common import new_id, utcnow
from webapp.records.models import Visibility


class Dataset(SQLModel, table=True):
    __tablename__ = "dataset"
    __table_args__ = (UniqueConstraint("owner_id", "name", name="uq_dataset_owner_name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    name: str = Field(index=True, max_length=255)
    """Unique per owner."""
    owner_id: int | None = Field(default=None, foreign_key="user.id", index=True, ondelete="SET NULL")
    visibility: Visibility = Field(default=Visibility.PRIVATE)
    allowed_roles: str = Field(default="", max_length=1024)
    """Role ids as ``,3,7,``: who sees it when visibility is ``roles`` (``webapp.services.access``)."""
    image_count: int = 0
    bytes: int = Field(default=0, sa_type=BigInteger)
    """Images and caption files as stored (what the owner's disk quota counts)."""
    min_width: int = 0
    min_height: int = 0
    max_width: int = 0
    max_height: int = 0
    source: str = Field(default="upload", max_length=16)
    """upload / zip / resize."""
    source_detail: str | None = Field(default=None, max_length=512)
    """For a resized copy: the source dataset and the resolution."""
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class DatasetItem(SQLModel, table=True):
    """One image of a dataset; its caption is also stored beside it as ``<stem>.txt``."""

    __tablename__ = "dataset_item"
    __table_args__ = (UniqueConstraint("dataset_id", "folder", "file_name", name="uq_dataset_item_path"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    dataset_id: str = Field(foreign_key="dataset.id", index=True, max_length=32, ondelete="CASCADE")
    folder: str = Field(max_length=255)
    """kohya's ``<repeats>_<name>`` folder."""
    repeats: int = 1
    file_name: str = Field(max_length=255)
    caption: str | None = None
    """None: the image has no caption file (listed as a warning); '' is an empty caption file."""
    width: int = 0
    height: int = 0
    size: int = Field(default=0, sa_type=BigInteger)
    """Bytes of the image plus its caption file."""
    content_type: str = Field(default="image/png", max_length=32)

    @property
    def relative_path(self) -> str:
        return f"{self.folder}/{self.file_name}"
