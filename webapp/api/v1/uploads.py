"""``/api/v1/uploads``: the chunked, resumable upload protocol (see webapp/services/models/uploads.py).

    POST   /api/v1/uploads                 {file_name, size, type, ...}  -> 201 {id, received: 0, chunk_size}
    PUT    /api/v1/uploads/{id}            body = bytes at Content-Range "bytes a-b/size" (or ?offset=a)
    GET    /api/v1/uploads/{id}            -> {received, ...}; also the ``Upload-Offset`` header
    POST   /api/v1/uploads/{id}/complete   -> 202 import task
    DELETE /api/v1/uploads/{id}            -> 204 (bytes and reserved row removed)
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from webapp.api.deps import CurrentUser
from webapp.records import ModelType, Visibility
from webapp.services.errors import InvalidInput
from webapp.services.models.uploads import CHUNK_HINT, Uploads
from webapp.services.models.views import task_view, upload_view

_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class UploadCreate(BaseModel):
    file_name: str
    size: int = Field(gt=0)
    type: ModelType
    name: str | None = None
    description: str | None = None
    visibility: Visibility = Visibility.EVERYONE
    allowed_roles: list[str | int] | None = Field(None, description="Role names (or ids) who see the model when "
                                                  "`visibility` is `roles`")
    sha256: str | None = Field(None, description="Optional: checked against the received bytes before import")


def _offset(request: Request, offset: int | None) -> int:
    header = request.headers.get("content-range")
    if header:
        match = _RANGE.match(header.strip())
        if match is None:
            raise InvalidInput(f"Content-Range {header!r} is not 'bytes start-end/size'", field="content-range")
        return int(match.group(1))
    if offset is None:
        raise InvalidInput("send the chunk's position as Content-Range or ?offset=", field="offset")
    if offset < 0:
        raise InvalidInput("`offset` must be >= 0", field="offset")
    return offset


def build_router(uploads: Uploads) -> APIRouter:
    router = APIRouter(prefix="/api/v1/uploads", tags=["uploads"])

    @router.post("", status_code=status.HTTP_201_CREATED)
    def create(user: CurrentUser, body: UploadCreate) -> dict[str, Any]:
        session = uploads.create(actor=user, file_name=body.file_name, size=body.size, type=body.type, name=body.name,
                                 description=body.description, visibility=body.visibility, sha256=body.sha256,
                                 allowed_roles=body.allowed_roles)
        return upload_view(session, chunk_size=CHUNK_HINT)

    @router.get("/{upload_id}")
    def get(user: CurrentUser, upload_id: str, response: Response) -> dict[str, Any]:
        session = uploads.status(actor=user, upload_id=upload_id)
        response.headers["upload-offset"] = str(session.received)
        response.headers["cache-control"] = "no-store"
        return upload_view(session, chunk_size=CHUNK_HINT)

    @router.put("/{upload_id}")
    async def put_chunk(user: CurrentUser, upload_id: str, request: Request, offset: int | None = None) -> Response:
        start = _offset(request, offset)
        try:
            received = await uploads.receive(actor=user, upload_id=upload_id, offset=start, chunks=request.stream())
        except ClientDisconnect:  # the bytes that arrived are kept; the client resumes from GET's offset
            return Response(status_code=400)
        return Response(content=f'{{"received": {received}}}', media_type="application/json",
                        headers={"upload-offset": str(received)})

    @router.post("/{upload_id}/complete", status_code=status.HTTP_202_ACCEPTED)
    def complete(user: CurrentUser, upload_id: str) -> dict[str, Any]:
        return task_view(uploads.complete(actor=user, upload_id=upload_id))

    @router.delete("/{upload_id}", status_code=status.HTTP_204_NO_CONTENT)
    async def abort(user: CurrentUser, upload_id: str) -> Response:
        await run_in_threadpool(uploads.abort, actor=user, upload_id=upload_id)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return router
