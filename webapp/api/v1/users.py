"""``/api/v1/users`` (administrators): the same UserService as the Users tab.

ESD users delete in bulk with ``DELETE /users {"user_name_list": [...]}``; that form is accepted too.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, status
from pydantic import BaseModel, Field, StrictBool

from webapp.api.deps import CurrentUser
from webapp.records import UserPublic
from webapp.services.access import authorize
from webapp.services.auth import AuthService
from webapp.services.errors import InvalidInput, NotFound
from webapp.services.users import UserService


class UserCreate(BaseModel):
    username: str
    password: str
    roles: list[str] | None = Field(None, description="Role names; default: the seeded Designer role")
    role: str | None = Field(None, description="Earlier releases' `admin` / `user` (Admin / Designer)")


class PasswordReset(BaseModel):
    password: str = Field(description="The new password; every session of the user ends")
    revoke_tokens: StrictBool = Field(True, description="Also revoke the user's API tokens")


class UserDeleteMany(BaseModel):
    user_name_list: list[str]


def build_router(users: UserService, auth: AuthService) -> APIRouter:
    router = APIRouter(prefix="/api/v1/users", tags=["users"])

    @router.get("")
    def list_users(user: CurrentUser) -> list[UserPublic]:
        return users.list_users(actor=user)

    @router.post("", status_code=status.HTTP_201_CREATED)
    def create_user(user: CurrentUser, body: UserCreate) -> UserPublic:
        created = users.create_user(actor=user, username=body.username, password=body.password, role=body.role,
                                    roles=body.roles)
        return next(u for u in users.list_users(actor=user) if u.id == created.id)

    @router.delete("/{username}")
    def delete_user(user: CurrentUser, username: str) -> dict[str, Any]:
        users.delete_user(actor=user, username=username)
        auth.forget_credentials()
        return {"deleted": [username]}

    @router.delete("")
    def delete_users(user: CurrentUser, body: UserDeleteMany = Body(...)) -> dict[str, Any]:  # noqa: B008
        """ESD's bulk form. Unknown names refuse the whole request; otherwise users are deleted in order."""
        if not body.user_name_list:
            raise InvalidInput("`user_name_list` must name at least one user", field="user_name_list")
        authorize(user, "user:delete")  # before looking names up: a non-admin must not learn which users exist
        missing = [name for name in body.user_name_list if users.get_by_name(name) is None]
        if missing:  # refuse the whole request before deleting anyone
            raise NotFound(f"no user named {', '.join(repr(m) for m in missing)}", field="user_name_list")
        deleted: list[str] = []
        for name in body.user_name_list:
            users.delete_user(actor=user, username=name)
            deleted.append(name)
        auth.forget_credentials()
        return {"deleted": deleted}

    @router.put("/{username}/password")
    def reset_password(user: CurrentUser, username: str, body: PasswordReset) -> dict[str, Any]:
        users.reset_password(actor=user, username=username, new_password=body.password,
                             revoke_tokens=body.revoke_tokens)
        return {"username": username, "password_reset": True, "tokens_revoked": body.revoke_tokens}

    return router
