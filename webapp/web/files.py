"""Result images through our own authorised route: ``GET /files/jobs/{job_id}/{n}.png``.

Only the job's owner or an administrator gets the bytes; anyone else gets 404 (the id reveals
nothing). The PNG is served exactly as stored, so a download keeps its ``parameters`` chunk. Gradio's
file cache is never used for results: its URLs open for any signed-in user who has them.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Response

from webapp.api.deps import CurrentUser
from webapp.services.errors import NotFound
from webapp.services.jobs import JobService

_NAME = re.compile(r"(\d{1,4})\.png")


def build_files_router(jobs: JobService) -> APIRouter:
    router = APIRouter()

    @router.get("/files/jobs/{job_id}/{name}", include_in_schema=False)
    def job_image(job_id: str, name: str, user: CurrentUser, download: bool = False) -> Response:
        match = _NAME.fullmatch(name)
        if match is None:
            raise NotFound(f"no file {name!r} in job {job_id!r}")
        index = int(match.group(1))
        data = jobs.image(actor=user, job_id=job_id, index=index)
        disposition = "attachment" if download else "inline"
        return Response(data, media_type="image/png", headers={
            "cache-control": "private, max-age=3600",
            "content-disposition": f'{disposition}; filename="{job_id}-{index}.png"',
            "x-content-type-options": "nosniff",
        })

    return router
