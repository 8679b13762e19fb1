"""``/api/v1/datasets``: training datasets in kohya's layout (create, list, browse, captions, resize, delete).

Thin over `DatasetService`, which validates and authorises. Creating takes multipart form data: ``name``,
``repeats``, ``visibility`` and either ``files`` (images, optionally named ``<N>_<name>/<file>``, and
``.txt`` captions; ``captions`` may add a JSON object of image file name → caption) or one ``zip``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from webapp.api.deps import CurrentUser
from webapp.records import Visibility
from webapp.services.datasets import Created, DatasetService
from webapp.services.datasets.layout import SourceFile
from webapp.services.datasets.views import dataset_view, item_view
from webapp.services.errors import InvalidInput
from webapp.services.sharing import role_list

MAX_PAGE = 200


class CaptionUpdate(BaseModel):
    caption: str


ROLES_HELP = "Role names (or ids) who see the dataset when `visibility` is `roles`; refused with another visibility"


class DatasetUpdate(BaseModel):
    name: str | None = None
    visibility: Visibility | None = None
    allowed_roles: list[str | int] | None = Field(None, description=ROLES_HELP)


class ResizeRequest(BaseModel):
    width: int = Field(description="Multiple of 8, 64..4096")
    height: int = Field(description="Multiple of 8, 64..4096")
    mode: str = Field("crop", description="crop (cover, centred crop), fit (fit inside, fill the bands) or stretch")
    name: str | None = Field(None, description="Name of the new dataset (default: '<name> <W>x<H>')")
    visibility: Visibility = Visibility.PRIVATE
    allowed_roles: list[str | int] | None = Field(None, description=ROLES_HELP)


def _upload_source(upload: UploadFile) -> SourceFile:
    handle = upload.file

    def load() -> bytes:
        handle.seek(0)
        return handle.read()

    return SourceFile(name=upload.filename or "", size=upload.size or 0, load=load)


def _captions(raw: str | None) -> dict[str, str] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"`captions` is not valid JSON ({exc.msg})", field="captions") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidInput("`captions` must be a JSON object of image file name → caption text", field="captions")
    return value


def build_router(datasets: DatasetService) -> APIRouter:
    router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])

    def view(dataset: Any, user: Any) -> dict[str, Any]:
        return dataset_view(dataset, actor=user, owner_name=datasets.owner_names([dataset]).get(dataset.owner_id),
                            location=datasets.location(dataset, actor=user), role_names=datasets.role_names())

    def created_view(created: Created, user: Any) -> dict[str, Any]:
        return {**view(created.dataset, user), "warnings": created.warnings}

    @router.post("", status_code=status.HTTP_201_CREATED)
    async def create_dataset(
        user: CurrentUser, name: Annotated[str, Form()], repeats: Annotated[int, Form()] = 1,
        visibility: Annotated[str, Form()] = Visibility.PRIVATE.value,
        captions: Annotated[str | None, Form(description="JSON object: image file name → caption")] = None,
        allowed_roles: Annotated[str | None, Form(description="Comma-separated role names, with visibility "
                                                              "`roles`")] = None,
        files: Annotated[list[UploadFile] | None, File(description="images and .txt captions")] = None,
        zip: Annotated[UploadFile | None, File(description="a zip in kohya's layout")] = None,  # noqa: A002
    ) -> dict[str, Any]:
        """Create a dataset from ``files`` or one ``zip`` (not both); answers the dataset and its warnings."""
        if (zip is None) == (not files):
            raise InvalidInput("send either `files` or one `zip`", field="files" if zip is None else "zip")
        if zip is not None:
            created = await run_in_threadpool(datasets.create_from_zip, actor=user, name=name, zip_file=zip.file,
                                              repeats=repeats, visibility=visibility,
                                              allowed_roles=role_list(allowed_roles))
        else:
            sources = [_upload_source(f) for f in files or []]
            created = await run_in_threadpool(datasets.create, actor=user, name=name, files=sources, repeats=repeats,
                                              visibility=visibility, captions=_captions(captions),
                                              allowed_roles=role_list(allowed_roles))
        return await run_in_threadpool(created_view, created, user)

    @router.get("")
    def list_datasets(user: CurrentUser, limit: int = Query(50, ge=1, le=MAX_PAGE),
                      offset: int = Query(0, ge=0)) -> dict[str, Any]:
        """Datasets the caller may see (own + shared; admins: all)."""
        found = datasets.list_datasets(actor=user, limit=limit, offset=offset)
        owners, roles = datasets.owner_names(found), datasets.role_names()
        return {
            "items": [dataset_view(d, actor=user, owner_name=owners.get(d.owner_id),
                                   location=datasets.location(d, actor=user), role_names=roles) for d in found],
            "total": datasets.count_datasets(actor=user), "limit": limit, "offset": offset,
        }

    @router.get("/{dataset_id}")
    def get_dataset(user: CurrentUser, dataset_id: str, limit: int = Query(50, ge=1, le=MAX_PAGE),
                    offset: int = Query(0, ge=0)) -> dict[str, Any]:
        """The dataset and a page of its images with captions (``items``; ``image_count`` is the total)."""
        dataset = datasets.get(actor=user, dataset_id=dataset_id)
        items = datasets.items(actor=user, dataset_id=dataset_id, limit=limit, offset=offset)
        return {**view(dataset, user), "items": [item_view(i) for i in items], "limit": limit, "offset": offset}

    @router.patch("/{dataset_id}")
    def update_dataset(user: CurrentUser, dataset_id: str, body: DatasetUpdate) -> dict[str, Any]:
        return view(datasets.update(actor=user, dataset_id=dataset_id, name=body.name, visibility=body.visibility,
                                    allowed_roles=body.allowed_roles), user)

    @router.get("/{dataset_id}/items/{item_id}/image")
    def get_image(user: CurrentUser, dataset_id: str, item_id: str) -> Response:
        data, content_type = datasets.image_bytes(actor=user, dataset_id=dataset_id, item_id=item_id)
        return Response(data, media_type=content_type, headers={"cache-control": "private, max-age=60"})

    @router.patch("/{dataset_id}/items/{item_id}")
    def set_caption(user: CurrentUser, dataset_id: str, item_id: str, body: CaptionUpdate) -> dict[str, Any]:
        """Replace an image's caption (its ``.txt`` beside it too); an empty caption is allowed."""
        return item_view(datasets.set_caption(actor=user, dataset_id=dataset_id, item_id=item_id, caption=body.caption))

    @router.post("/{dataset_id}/resize", status_code=status.HTTP_201_CREATED)
    def resize(user: CurrentUser, dataset_id: str, body: ResizeRequest) -> dict[str, Any]:
        """Every image at ``width`` x ``height`` in a NEW dataset of the caller's; the source is unchanged."""
        created = datasets.resize(actor=user, dataset_id=dataset_id, width=body.width, height=body.height,
                                  mode=body.mode, name=body.name, visibility=body.visibility,
                                  allowed_roles=body.allowed_roles)
        return created_view(created, user)

    @router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
    def delete_dataset(user: CurrentUser, dataset_id: str) -> Response:
        datasets.delete(actor=user, dataset_id=dataset_id)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return router
