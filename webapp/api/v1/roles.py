"""``/api/v1/roles``, ``/api/v1/users/{username}/roles`` and ``/api/v1/permissions``: the RoleService the Users
tab uses, over HTTP.

The rules live in the service: ``role:*`` / ``user:update`` permissions (403 naming the one lacking), a caller
grants only what they hold (403 naming what they lack), the last administrator stays (409). A role is named by
its name or its id in paths.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field

from webapp.api.deps import CurrentUser
from webapp.services.access import ACTIONS, ALL_PERMISSIONS, DESCRIPTIONS, RESOURCES
from webapp.services.errors import InvalidInput
from webapp.services.roles import QUOTA_FIELDS, RoleService, RoleView

_QUOTA_HELP = "null: no limit from this role (a user gets the most generous value among their roles)"


class RoleCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    permissions: list[str] = Field(description="resource:action permissions, each one you hold yourself")
    max_queued_jobs: int | None = Field(None, description=_QUOTA_HELP)
    max_jobs_per_day: int | None = Field(None, description=_QUOTA_HELP)
    max_gpu_seconds_per_day: int | None = Field(None, description=_QUOTA_HELP)
    max_storage_mb: int | None = Field(None, description=_QUOTA_HELP)


class RoleUpdate(BaseModel):
    """Only the fields sent change; a quota sent as null becomes "no limit from this role"."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    permissions: list[str] | None = Field(None, description="The role's whole new list; each permission added "
                                                            "or removed must be one you hold")
    max_queued_jobs: int | None = None
    max_jobs_per_day: int | None = None
    max_gpu_seconds_per_day: int | None = None
    max_storage_mb: int | None = None


class UserRoles(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roles: list[str | int] = Field(description="Role names or ids: exactly the roles the user will hold")


class ResourceInfo(BaseModel):
    name: str
    description: str
    permissions: list[str]


class Vocabulary(BaseModel):
    resources: list[ResourceInfo]
    actions: list[str]
    permissions: list[str]
    note: str


VOCABULARY_NOTE = (
    "A permission is resource:action. <resource>:all holds every action on the resource and reaches every "
    "user's items of it; without it an action reaches your own items, plus (list, use) items shared with you.")


def build_router(roles: RoleService) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["roles"])

    @router.get("/permissions")
    def permissions(user: CurrentUser) -> Vocabulary:
        """The permission vocabulary (any signed-in user: it names what roles and token scopes may hold)."""
        return Vocabulary(
            resources=[ResourceInfo(name=r, description=DESCRIPTIONS[r], permissions=[f"{r}:{a}" for a in ACTIONS])
                       for r in RESOURCES],
            actions=list(ACTIONS), permissions=sorted(ALL_PERMISSIONS), note=VOCABULARY_NOTE)

    @router.get("/roles")
    def list_roles(user: CurrentUser) -> list[RoleView]:
        """Every role with its permissions (compact), quotas and member count (``role:list``)."""
        return roles.list_roles(actor=user)

    @router.post("/roles", status_code=status.HTTP_201_CREATED)
    def create_role(user: CurrentUser, body: RoleCreate) -> RoleView:
        """A new role (``role:create``); it may hold only permissions you hold."""
        return roles.create_role(actor=user, name=body.name, description=body.description,
                                 permissions=body.permissions, **{f: getattr(body, f) for f in QUOTA_FIELDS})

    @router.get("/roles/{role}")
    def get_role(user: CurrentUser, role: str) -> RoleView:
        return roles.get_role(actor=user, role=role)

    @router.patch("/roles/{role}")
    def update_role(user: CurrentUser, role: str, body: RoleUpdate) -> RoleView:
        """Change what is sent (``role:update``); members' permissions change at once, their old API tokens'
        too. Refused (409) when it would leave no administrator."""
        sent = body.model_fields_set
        for field in ("name", "description", "permissions"):
            if field in sent and getattr(body, field) is None:
                raise InvalidInput(f"`{field}` cannot be null (leave it out to keep it)", field=field)
        return roles.update_role(actor=user, role=role, name=body.name, description=body.description,
                                 permissions=body.permissions,
                                 **{f: getattr(body, f) for f in QUOTA_FIELDS if f in sent})

    @router.delete("/roles/{role}")
    def delete_role(user: CurrentUser, role: str) -> dict[str, Any]:
        """Delete a role (``role:delete``): its members lose it, items shared with it no longer are."""
        return {"deleted": roles.delete_role(actor=user, role=role)}

    @router.put("/users/{username}/roles")
    def set_user_roles(user: CurrentUser, username: str, body: UserRoles) -> dict[str, Any]:
        """Give a user exactly these roles (``user:update``); each role given or taken away must hold only
        permissions you hold. Refused (409) when it would leave no administrator."""
        return {"username": username, "roles": roles.set_user_roles(actor=user, username=username, roles=body.roles)}

    return router
