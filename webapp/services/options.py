"""A1111 options per server and per user (``GET``/``POST /sdapi/v1/options``).

A1111 keeps one global options dict, so one API client switching the model switches it for everyone.
Here the dict is layered: A1111's defaults, then the server defaults an administrator set, then the
values a user set for themselves. An administrator's POST sets server defaults; anyone else's POST
changes only their own view and their own API jobs. Checkpoint and VAE choices are stored by sha256
(stable across renames) and shown as A1111 titles/names when read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sqlmodel import delete, select

from webapp.db import Database
from webapp.records import ModelRecord, ModelStatus, ModelType, ServerOption, User, UserOption, utcnow
from webapp.services import audit
from webapp.services.a1111_options import API_RESTRICTED, DEFAULTS, DERIVED, SAMPLES_FORMATS
from webapp.services.errors import InvalidInput, NotFound
from webapp.services.text import check_text

log = logging.getLogger(__name__)

VAE_CHOICES = ("Automatic", "None")


class ModelCatalog(Protocol):
    """What options need from the model registry (``ModelRegistry`` satisfies it)."""

    def find(self, *, actor: User, type: ModelType, ref: str) -> ModelRecord: ...

    def list_models(self, *, actor: User, type: ModelType | None = None) -> list[ModelRecord]: ...


@dataclass(frozen=True)
class GenerationDefaults:
    """What a user's options mean for their next API job."""

    checkpoint: ModelRecord | None
    vae: str | ModelRecord  # "Automatic", "None" or a VAE record
    clip_skip: int
    samples_format: str
    jpeg_quality: int
    enable_pnginfo: bool
    live_previews: bool


def _type_name(default: Any) -> str:
    if isinstance(default, bool):
        return "boolean"
    if isinstance(default, int | float):
        return "number"
    if isinstance(default, list):
        return "list"
    return "string"


def check_value(key: str, value: Any) -> Any:
    """Validate one option against the type of its default; returns the value to store."""
    default = DEFAULTS[key]
    if default is None:
        ok = value is None or isinstance(value, str)
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int | float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and isinstance(default, int) and isinstance(value, float) and value.is_integer():
            value = int(value)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise InvalidInput(f"option `{key}` must be a {_type_name(default)} but is {value!r}", field=key)
    if key == "samples_format" and value.lower() not in SAMPLES_FORMATS:
        raise InvalidInput(f"`samples_format` must be one of {', '.join(SAMPLES_FORMATS)} but is {value!r}",
                           field=key)
    if key == "CLIP_stop_at_last_layers" and not (isinstance(value, int) and 1 <= value <= 12):
        raise InvalidInput(f"`CLIP_stop_at_last_layers` must be an integer from 1 to 12 but is {value!r}", field=key)
    if key == "jpeg_quality" and not 1 <= value <= 100:
        raise InvalidInput(f"`jpeg_quality` must be between 1 and 100 but is {value!r}", field=key)
    return value.lower() if key == "samples_format" else value


class OptionsService:
    def __init__(self, db: Database, catalog: ModelCatalog) -> None:
        self._db = db
        self._catalog = catalog

    # -- reading --------------------------------------------------------------------------------------
    def _layers(self, actor: User) -> tuple[dict[str, Any], dict[str, Any]]:
        """(server-level raw values, the user's own raw values)."""
        with self._db.read() as s:
            server = {r.key: json.loads(r.value_json) for r in s.exec(select(ServerOption)).all()}
            own = {r.key: json.loads(r.value_json)
                   for r in s.exec(select(UserOption).where(UserOption.user_id == actor.id)).all()}
        base = dict(DEFAULTS)
        base.update({k: v for k, v in server.items() if k in DEFAULTS})
        return base, {k: v for k, v in own.items() if k in DEFAULTS}

    def _raw(self, actor: User) -> dict[str, Any]:
        base, own = self._layers(actor)
        base.update(own)
        return base

    def _model_by_hash(self, actor: User, type_: ModelType, sha256: str | None) -> ModelRecord | None:
        if not sha256:
            return None
        try:
            record = self._catalog.find(actor=actor, type=type_, ref=sha256)
        except NotFound:
            return None
        return record if record.status == ModelStatus.ACTIVE else None

    def current_checkpoint(self, actor: User, raw: Mapping[str, Any] | None = None) -> ModelRecord | None:
        """The checkpoint the caller's API jobs use: their choice, else the server's, else the first one.

        A choice that no longer resolves (deleted, or private to someone else) falls back silently, the
        way A1111 falls back to another checkpoint when the configured file is gone.
        """
        raw = raw if raw is not None else self._raw(actor)
        chosen = self._model_by_hash(actor, ModelType.CHECKPOINT, raw.get("sd_model_checkpoint"))
        if chosen is not None:
            return chosen
        active = [m for m in self._catalog.list_models(actor=actor, type=ModelType.CHECKPOINT)
                  if m.status == ModelStatus.ACTIVE]
        return min(active, key=lambda m: m.name.lower()) if active else None

    def default_checkpoint_ref(self, actor: User) -> str | None:
        """JobService's hook: the sha256 of the checkpoint a request naming none runs on, for ``actor``."""
        checkpoint = self.current_checkpoint(actor)
        return checkpoint.sha256 if checkpoint is not None else None

    def _current_vae(self, actor: User, raw: Mapping[str, Any]) -> str | ModelRecord:
        value = raw.get("sd_vae") or "Automatic"
        if value in VAE_CHOICES:
            return value
        return self._model_by_hash(actor, ModelType.VAE, value) or "Automatic"

    def get(self, *, actor: User) -> dict[str, Any]:
        """The full A1111 options dict as this caller sees it."""
        raw = self._raw(actor)
        checkpoint = self.current_checkpoint(actor, raw)
        vae = self._current_vae(actor, raw)
        out = dict(raw)
        out["sd_model_checkpoint"] = checkpoint.title if checkpoint else None
        out["sd_checkpoint_hash"] = (checkpoint.sha256 or "") if checkpoint else ""
        out["sd_vae"] = vae if isinstance(vae, str) else vae.name
        return out

    def generation_defaults(self, *, actor: User) -> GenerationDefaults:
        raw = self._raw(actor)
        return GenerationDefaults(
            checkpoint=self.current_checkpoint(actor, raw), vae=self._current_vae(actor, raw),
            clip_skip=int(raw["CLIP_stop_at_last_layers"]), samples_format=str(raw["samples_format"]).lower(),
            jpeg_quality=int(raw["jpeg_quality"]),
            enable_pnginfo=bool(raw["enable_pnginfo"]), live_previews=bool(raw["live_previews_enable"]),
        )

    # -- writing ----------------------------------------------------------------------------------------
    def resolve_checkpoint(self, *, actor: User, ref: str) -> ModelRecord:
        """A checkpoint by title, name, AutoV2 or sha256; NotFound (field ``sd_model_checkpoint``) otherwise."""
        try:
            record = self._catalog.find(actor=actor, type=ModelType.CHECKPOINT, ref=str(ref))
        except NotFound:
            record = None
        if record is None or record.status != ModelStatus.ACTIVE or not record.sha256:
            raise NotFound(f"model {ref!r} not found", field="sd_model_checkpoint")
        return record

    def resolve_vae(self, *, actor: User, ref: str) -> str | ModelRecord:
        if ref in VAE_CHOICES:
            return ref
        try:
            record = self._catalog.find(actor=actor, type=ModelType.VAE, ref=str(ref))
        except NotFound:
            record = None
        if record is None or record.status != ModelStatus.ACTIVE or not record.sha256:
            raise InvalidInput(f"VAE {ref!r} not found; use Automatic, None or a name from /sdapi/v1/sd-vae",
                               field="sd_vae")
        return record

    def _stored_value(self, actor: User, key: str, value: Any) -> Any:
        if key == "sd_model_checkpoint":
            return self.resolve_checkpoint(actor=actor, ref=value).sha256
        if key == "sd_vae":
            if not isinstance(value, str):
                raise InvalidInput(f"`sd_vae` must be a string but is {value!r}", field=key)
            vae = self.resolve_vae(actor=actor, ref=value)
            return vae if isinstance(vae, str) else vae.sha256
        return check_value(key, value)

    def set(self, *, actor: User, values: Mapping[str, Any]) -> list[str]:
        """Apply a partial or whole options dict; returns the keys that changed.

        Unknown, derived and API-restricted keys are skipped (Open WebUI posts the whole dict back).
        Everything is validated before anything is written, so a bad value changes nothing.
        """
        if not isinstance(values, Mapping):
            raise InvalidInput("the options body must be a JSON object", field="body")
        check_text(values)
        skipped = sorted(k for k in values if k not in DEFAULTS or k in API_RESTRICTED or k in DERIVED)
        if skipped:
            log.debug("options POST by %s skipped keys: %s", actor.username, ", ".join(skipped[:20]))
        wanted = {k: v for k, v in values.items() if k in DEFAULTS and k not in API_RESTRICTED and k not in DERIVED}
        if wanted.get("sd_model_checkpoint") in (None, ""):
            wanted.pop("sd_model_checkpoint", None)  # "no checkpoint" is not a choice: keep the current one
        stored = {key: self._stored_value(actor, key, value) for key, value in wanted.items()}
        base, own = self._layers(actor)
        # Models are compared with the one the caller runs on now, whichever layer (or the fallback) chose
        # it: Open WebUI posts the whole dict back, and storing the fallback would pin it for good.
        effective = self._effective_choices(actor, {**base, **own}) if {"sd_model_checkpoint", "sd_vae"} & set(
            stored) else {}
        changed: list[str] = []
        with self._db.write() as s:
            for key, value in stored.items():
                if actor.is_admin:
                    current, fallback = base.get(key), DEFAULTS[key]
                    row_type: type[ServerOption] | type[UserOption] = ServerOption
                    where = [ServerOption.key == key]
                else:
                    current, fallback = own.get(key, base.get(key)), base.get(key)
                    row_type = UserOption
                    where = [UserOption.user_id == actor.id, UserOption.key == key]
                if value == effective.get(key, current):
                    continue
                changed.append(key)
                s.exec(delete(row_type).where(*where))
                if value != fallback:  # a value equal to the layer below needs no row
                    extra = {} if actor.is_admin else {"user_id": actor.id}
                    s.add(row_type(key=key, value_json=json.dumps(value), updated_at=utcnow(), **extra))
            if changed and actor.is_admin:  # server defaults change every user's options: audited
                audit.record(s, actor, "options.defaults", "server defaults",
                             changed={key: stored[key] for key in changed})
        if changed:
            scope = "server defaults" if actor.is_admin else "own options"
            log.info("%s changed %s: %s", actor.username, scope, ", ".join(changed))
        return changed

    def _effective_choices(self, actor: User, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Stored forms of the checkpoint and VAE the caller runs on now, whichever layer they come from."""
        checkpoint = self.current_checkpoint(actor, raw)
        vae = self._current_vae(actor, raw)
        return {"sd_model_checkpoint": checkpoint.sha256 if checkpoint else None,
                "sd_vae": vae if isinstance(vae, str) else vae.sha256}

    def reset_own(self, *, actor: User) -> None:
        """Forget the caller's own option values (they see the server defaults again)."""
        with self._db.write() as s:
            s.exec(delete(UserOption).where(UserOption.user_id == actor.id))

