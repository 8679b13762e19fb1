"""``/api/v1/tasks``: progress of model imports (own tasks; administrators see all)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from webapp.api.deps import CurrentUser
from webapp.services.models.tasks import ImportTasks
from webapp.services.models.views import task_view


def build_router(tasks: ImportTasks) -> APIRouter:
    router = APIRouter(prefix="/api/v1/tasks", tags=["tasks"])

    @router.get("")
    def list_tasks(user: CurrentUser, limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0)) -> dict:
        return {"items": [task_view(t) for t in tasks.list_tasks(actor=user, limit=limit, offset=offset)],
                "limit": limit, "offset": offset}

    @router.get("/{task_id}")
    def get_task(user: CurrentUser, task_id: str) -> dict[str, Any]:
        return task_view(tasks.get(actor=user, task_id=task_id))

    return router
