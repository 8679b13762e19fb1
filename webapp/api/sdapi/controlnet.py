"""sd-webui-controlnet's HTTP routes (``/controlnet/*``), answered in the extension's shapes
(https://github.com/Mikubill/sd-webui-controlnet, `scripts/api.py`) over the studio's services: model lists
hold only the caller's ControlNet models; ``detect`` and ``render_openpose_json`` run through
``ControlNetService`` in a worker thread.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Body
from pydantic import BaseModel, Field

from pipelines.controlnet import preprocessors
from webapp.api.deps import CurrentUser
from webapp.api.sdapi.errors import A1111Route
from webapp.services.controlnet import ControlNetService, png_b64

API_VERSION = 3
PREFIX = "/controlnet"


class DetectBody(BaseModel):
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_masks: list[str] = Field(default_factory=list)
    controlnet_processor_res: float = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    low_vram: bool = False


def build_router(service: ControlNetService, unit_count: int) -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=A1111Route, tags=["ControlNet (/controlnet)"])

    @router.get("/version")
    def version(user: CurrentUser) -> dict[str, int]:
        return {"version": API_VERSION}

    @router.get("/model_list")
    def model_list(user: CurrentUser, update: bool = True) -> dict[str, list[str]]:
        return {"model_list": service.model_titles(actor=user)}

    @router.get("/module_list")
    def module_list(user: CurrentUser, alias_names: bool = False) -> dict[str, Any]:
        return {"module_list": preprocessors.list_modules(alias_names),
                "module_detail": preprocessors.module_detail(alias_names)}

    @router.get("/control_types")
    def control_types(user: CurrentUser) -> dict[str, Any]:
        return {"control_types": preprocessors.control_types(service.model_titles(actor=user))}

    @router.get("/settings")
    def settings(user: CurrentUser) -> dict[str, int]:
        return {"control_net_unit_count": unit_count}

    @router.post("/detect")
    async def detect(body: DetectBody, user: CurrentUser) -> dict[str, Any]:
        def run() -> Any:
            return service.detect(actor=user, module=body.controlnet_module, images=body.controlnet_input_images,
                                  masks=body.controlnet_masks, processor_res=body.controlnet_processor_res,
                                  threshold_a=body.controlnet_threshold_a, threshold_b=body.controlnet_threshold_b)

        found = await anyio.to_thread.run_sync(run)
        answer: dict[str, Any] = {"info": "Success", "images": [png_b64(m) for m in found.images]}
        if found.poses is not None:
            answer["poses"] = found.poses
        if found.warnings:
            answer["warnings"] = found.warnings
        return answer

    @router.post("/render_openpose_json")
    async def render_openpose_json(user: CurrentUser, pose_data: list[dict[str, Any]] = Body(default_factory=list)
                                   ) -> dict[str, Any]:
        """A list of OpenPose JSON canvases (``people``, ``canvas_width``, ``canvas_height``), as
        ``/controlnet/detect`` returns them, drawn into pose maps; ``images`` holds one base64 PNG per canvas."""
        if not pose_data:
            return {"info": "No pose data detected."}  # the extension's answer, with 200
        maps = await anyio.to_thread.run_sync(lambda: service.render_poses(actor=user, poses=pose_data))
        return {"images": [png_b64(m) for m in maps], "info": "Success"}

    return router
