"""Import models from paths on the server: single files, several at once, or a whole A1111 ``models/``.

Admins only, and only under the configured import roots: each path has symlinks and ``..`` resolved
*before* the check (so ``roots/../etc/x`` and a symlink pointing out of a root are refused), and again
right before the file is read (a symlink swapped in between is refused too). Files are registered in
place (referenced, nothing copied — the A1111 folder stays usable by A1111) or copied into the asset
store. Paths are validated when the request arrives, so a typo is a 422 at once; the hashing and
storing run as a background task with a progress line per file. A diffusers ControlNet folder, named
or found inside a named folder, is one item; the importer packs it into one stored file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.controlnet.folders import is_controlnet_folder
from webapp.records import ImportTask, ModelType, TaskKind, User, Visibility
from webapp.services.access import authorize
from webapp.services.errors import InvalidInput, ServiceError
from webapp.services.models import catalog
from webapp.services.models.importer import Importer, ImportRequest
from webapp.services.models.scan import is_a1111_folder, iter_model_files, walk_models, within_roots
from webapp.services.models.tasks import ImportTasks, TaskContext

MAX_FILES = 10_000


def parse_paths(paths: str | Sequence[str]) -> list[str]:
    """A list, or text with one path per line (commas also separate, as in the original tab)."""
    raw = [paths] if isinstance(paths, str) else list(paths)
    out: list[str] = []
    for entry in raw:
        out += [p.strip() for p in re.split(r"[\n,]", entry or "") if p.strip()]
    if not out:
        raise InvalidInput("`paths` must name at least one file or folder on the server", field="paths")
    return out


class ServerImports:
    def __init__(self, importer: Importer, tasks: ImportTasks, roots: Sequence[Path]) -> None:
        self._importer = importer
        self._tasks = tasks
        self.roots = [Path(r).resolve() for r in roots]
        tasks.register(TaskKind.SERVER, self._run)

    def roots_for(self, actor: User) -> list[Path]:
        """The import roots, for the administrator about to import (server paths: admins only)."""
        authorize(actor, "model:all")
        return list(self.roots)

    def check_path(self, text: str) -> Path:
        """The path, absolute, if it exists under an import root once symlinks and '..' are resolved."""
        path = Path(text).expanduser()
        if not path.is_absolute():
            raise InvalidInput(f"{text!r} is not an absolute path", field="paths")
        if not within_roots(path, self.roots):
            roots = ", ".join(str(r) for r in self.roots) or "(none configured)"
            raise InvalidInput(f"{text} resolves to {path.resolve()}, which is outside the import roots ({roots})",
                               field="paths")
        if not path.exists():
            raise InvalidInput(f"{text} does not exist on the server", field="paths")
        return path

    def start(
        self, *, actor: User, paths: str | Sequence[str], declared_type: ModelType | str | None = None,
        in_place: bool = True, description: str | None = None, visibility: Visibility | str = Visibility.EVERYONE,
        allowed_roles: Sequence[str | int] | None = None,
    ) -> ImportTask:
        authorize(actor, "model:create")
        authorize(actor, "model:all")  # server paths: only for those who manage every model
        model_type = catalog.parse_type(declared_type) if declared_type else None
        text, metadata = catalog.parse_description(description)
        vis, roles = self._importer.resolve_sharing(visibility, allowed_roles)
        items: list[dict[str, Any]] = []
        for entry in parse_paths(paths):
            path = self.check_path(entry)
            items += self._expand(path, model_type)
        if not items:
            raise InvalidInput("no model files (.safetensors, .ckpt, .pt, .pth, .bin) were found under those paths",
                               field="paths")
        if len(items) > MAX_FILES:
            raise InvalidInput(f"{len(items)} files in one import; at most {MAX_FILES}", field="paths")
        params = {"paths": parse_paths(paths), "type": model_type.value if model_type else None,
                  "in_place": in_place, "description": text, "metadata": metadata, "visibility": vis.value,
                  "allowed_roles": roles}
        return self._tasks.submit(kind=TaskKind.SERVER, owner=actor, params=params, items=items)

    def _expand(self, path: Path, model_type: ModelType | None) -> list[dict[str, Any]]:
        if path.is_file() or is_controlnet_folder(path):
            return [{"source": str(path), "type": model_type.value if model_type else None, "file_name": path.name}]
        if (path / "model_index.json").is_file():
            raise InvalidInput(f"{path} is a diffusers pipeline folder; import its single-file (.safetensors) form "
                               "(of diffusers folders, only ControlNets are imported)", field="paths")
        if is_a1111_folder(path):  # type folders decide the type; a declared type must agree
            found = list(iter_model_files(path))
            if model_type is not None:
                found = [f for f in found if f.type is model_type]
            return [{"source": str(f.path), "type": f.type.value, "file_name": f.relative} for f in found]
        return [{"source": str(f.path), "type": model_type.value if model_type else None, "file_name": f.relative}
                for f in walk_models(path)]

    def _run(self, ctx: TaskContext) -> None:
        params = ctx.params
        visibility = Visibility(params["visibility"])
        for index, item in enumerate(ctx.items):
            ctx.check_stop()
            if item.get("state") in ("done", "known", "failed"):
                continue
            try:
                path = self.check_path(item["source"])  # again: the file system may have changed since
                outcome = self._importer.import_file(path, ImportRequest(
                    owner=ctx.owner, declared_type=ModelType(item["type"]) if item.get("type") else None,
                    file_name=item.get("file_name"), in_place=bool(params["in_place"]), source="server",
                    source_detail=str(path), visibility=visibility,
                    allowed_roles=params.get("allowed_roles", ""), description=params.get("description"),
                    metadata=params.get("metadata"),
                ), progress=ctx.progress_callback(index))
            except ServiceError as exc:
                ctx.update(index, state="failed", message=exc.message)
                continue
            ctx.update(index, state="done" if outcome.created else "known", model_id=outcome.record.id,
                       model_name=outcome.record.name,
                       message="registered in place" if outcome.record.local_path else
                       ("stored" if outcome.created else "already registered (same bytes)"))
