"""The model registry: one row per distinct model file (deduplicated by sha256 among the models an importer
may see; users' private models holding the same bytes are separate rows sharing one stored file)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, UniqueConstraint
from sqlmodel import Field, SQLModel

from webapp.records.common import new_id, utcnow


class ModelType(StrEnum):
    """The six kinds users bring; values double as API names. ``a1111_folder`` is A1111's models/ subfolder."""

    CHECKPOINT = "checkpoint"
    EMBEDDING = "embedding"  # textual inversion
    LORA = "lora"
    CONTROLNET = "controlnet"
    HYPERNETWORK = "hypernetwork"
    VAE = "vae"

    @property
    def a1111_folder(self) -> str:
        return {
            "checkpoint": "Stable-diffusion", "embedding": "embeddings", "lora": "Lora",
            "controlnet": "ControlNet", "hypernetwork": "hypernetworks", "vae": "VAE",
        }[self.value]

    @property
    def label(self) -> str:
        return {
            "checkpoint": "Checkpoint", "embedding": "Textual inversion", "lora": "LoRA",
            "controlnet": "ControlNet", "hypernetwork": "Hypernetwork", "vae": "VAE",
        }[self.value]


class ModelStatus(StrEnum):
    INITIAL = "Initial"  # bytes arriving / being checked
    ACTIVE = "Active"
    FAILED = "Failed"


class Visibility(StrEnum):
    PRIVATE = "private"
    EVERYONE = "everyone"
    ROLES = "roles"
    """The owner and users holding one of the item's ``allowed_roles``."""


class ModelRecord(SQLModel, table=True):
    __tablename__ = "model"
    __table_args__ = (UniqueConstraint("type", "name", name="uq_model_type_name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    name: str = Field(index=True, max_length=255)
    """The name users write (prompt tags, dropdowns); unique per type; renameable."""
    type: ModelType = Field(index=True)
    base: str | None = Field(default=None, max_length=32)
    """Detected from the tensors: sd1, sd2, sdxl, sdxl-refiner, sd1-inpaint, sdxl-inpaint ..."""
    status: ModelStatus = Field(default=ModelStatus.INITIAL, index=True)
    failure_reason: str | None = None
    size: int = Field(default=0, sa_type=BigInteger)  # bytes: models pass 2 GiB (64-bit on PostgreSQL)
    sha256: str | None = Field(default=None, index=True, max_length=64)
    autov2: str | None = Field(default=None, max_length=10)
    """First 10 hex of sha256 (A1111 / Civitai short hash)."""
    lora_hash: str | None = Field(default=None, max_length=64)
    """A1111's AutoV3 hash for LoRAs (sha256 of the tensor data), full hex."""
    legacy_hash: str | None = Field(default=None, max_length=8)
    """A1111's old 8-hex checkpoint hash (sha256 of 64 KiB at 1 MiB); scripts still send it."""
    source_sha256: str | None = Field(default=None, index=True, max_length=64)
    """sha256 of the bytes the user brought when they differ from the stored file (a converted pickle):
    the same .ckpt uploaded twice is still one model."""
    file_name: str | None = Field(default=None, max_length=1024)
    """The file name users know, with extension (relative to the models folder for scanned files)."""
    file_format: str | None = Field(default=None, max_length=16)
    """safetensors / diffusers (a folder); pickles are converted to safetensors on import."""
    store_key: str | None = Field(default=None, max_length=512)
    """Key in the asset store, or None for a model registered in place on the server."""
    local_path: str | None = None
    """For models registered in place: the absolute path on this server."""
    source: str = Field(default="upload", max_length=16)
    """upload / server / url / scan."""
    source_detail: str | None = None
    """Where it came from (URL without credentials, server path)."""
    owner_id: int | None = Field(default=None, foreign_key="user.id", index=True, ondelete="SET NULL")
    visibility: Visibility = Field(default=Visibility.EVERYONE)
    allowed_roles: str = Field(default="", max_length=1024)
    """Role ids as ``,3,7,`` (``webapp.services.access.encode_roles``): who sees it when visibility is ``roles``."""
    description: str | None = None
    metadata_json: str | None = None
    """JSON: user metadata plus what the file says (safetensors metadata, LoRA rank, TI vectors ...)."""
    preview_key: str | None = Field(default=None, max_length=512)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    @property
    def title(self) -> str:
        """A1111's checkpoint title: ``name [shorthash]``."""
        return f"{self.name} [{self.autov2}]" if self.autov2 else self.name
