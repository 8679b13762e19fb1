"""``png-info``, ``memory`` and the refresh/unload routes.

``png-info`` reads the infotext A1111 (and the studio) embeds in PNG text chunks or JPEG/WebP EXIF and
parses it with A1111's rules. ``memory`` reports real figures of this process (psutil, and CUDA only if
torch is already loaded: importing torch to answer a status call would cost seconds and memory).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import psutil
from fastapi import APIRouter

from pipelines import infotext
from pipelines.images import open_image
from pipelines.types import decode_image_bytes
from webapp.api.deps import CurrentUser
from webapp.api.sdapi.context import SdapiContext
from webapp.api.sdapi.errors import A1111Error, A1111Route
from webapp.api.sdapi.schemas import PngInfoBody

log = logging.getLogger(__name__)


def png_info(data: bytes) -> dict[str, Any]:
    """Unreadable images and decompression bombs raise ``InvalidRequestError`` naming ``image`` (422)."""
    with open_image(data, "image") as image:
        items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str | int | float)
                 and k != "parameters"}
    text = infotext.read_infotext(data, "image") or ""
    return {"info": text, "items": items, "parameters": infotext.parse(text) if text else {}}


def memory_report() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    process = psutil.Process()
    ram = {"free": vm.available, "used": process.memory_info().rss, "total": vm.total}
    torch = sys.modules.get("torch")  # never imported here just to answer
    cuda: dict[str, Any] = {"error": "unavailable"}
    if torch is not None and torch.cuda.is_available():
        try:
            free, total = torch.cuda.mem_get_info()
            stats = torch.cuda.memory_stats()
            cuda = {
                "system": {"free": free, "used": total - free, "total": total},
                "active": {"current": stats.get("active_bytes.all.current", 0),
                           "peak": stats.get("active_bytes.all.peak", 0)},
                "allocated": {"current": stats.get("allocated_bytes.all.current", 0),
                              "peak": stats.get("allocated_bytes.all.peak", 0)},
                "reserved": {"current": stats.get("reserved_bytes.all.current", 0),
                             "peak": stats.get("reserved_bytes.all.peak", 0)},
                "inactive": {"current": stats.get("inactive_split_bytes.all.current", 0),
                             "peak": stats.get("inactive_split_bytes.all.peak", 0)},
                "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
            }
        except RuntimeError as exc:
            cuda = {"error": str(exc)}
    return {"ram": ram, "cuda": cuda}


def build_router(ctx: SdapiContext) -> APIRouter:
    router = APIRouter(route_class=A1111Route)

    @router.post("/png-info")
    def post_png_info(user: CurrentUser, body: PngInfoBody) -> dict[str, Any]:
        if not body.image.strip():
            return {"info": "", "items": {}, "parameters": {}}
        return png_info(decode_image_bytes(body.image.strip(), "image"))

    @router.get("/memory")
    def memory(user: CurrentUser) -> dict[str, Any]:
        return memory_report()

    def rescan(user: CurrentUser) -> None:
        """The registry is live (uploads appear at once); a refresh re-reads the server's models folder
        (non-administrators: rate limited server-wide, answered the same either way)."""
        summary = ctx.registry.refresh(actor=user)
        log.info("refresh by %s: %s", user.username, summary.line if summary else "skipped (one ran lately)")
        return None

    for path in ("/refresh-checkpoints", "/refresh-vae", "/refresh-loras", "/refresh-embeddings",
                 "/refresh-hypernetworks"):
        router.add_api_route(path, rescan, methods=["POST"], name=path.strip("/"))

    @router.post("/unload-checkpoint")
    def unload_checkpoint(user: CurrentUser) -> dict[str, Any]:
        """Every backend drops its loaded models (administrators only: it affects every user)."""
        ctx.jobs.release_memory(actor=user)
        return {}

    @router.post("/reload-checkpoint")
    def reload_checkpoint(user: CurrentUser) -> dict[str, Any]:
        """Nothing to do: backends load the checkpoint a job needs when it starts (and keep it cached)."""
        return {}

    @router.post("/interrogate")
    def interrogate(user: CurrentUser) -> None:
        raise A1111Error(501, "NotImplementedError", "no CLIP or DeepDanbooru interrogator is installed on this server")

    return router
