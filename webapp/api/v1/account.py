"""``/api/v1`` for the caller's own account: who am I, disk use, quotas, API tokens; and ``/api/v1/ping`` (ESD's
health check)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from webapp.api.deps import CurrentUser, TokenExpiry
from webapp.records import ApiTokenPublic
from webapp.services.access import compact
from webapp.services.jobs.quotas import JobQuotas
from webapp.services.quota import DiskQuota
from webapp.services.roles import RoleService
from webapp.services.tokens import MAX_EXPIRY_DAYS, TokenService


class Me(BaseModel):
    id: int
    username: str
    roles: list[str]
    permissions: list[str]
    is_admin: bool
    language: str | None
    created_at: datetime


class DiskUse(BaseModel):
    used_bytes: int = Field(description="Job results (requests and images) and stored model files you imported")
    limit_bytes: int | None = Field(description="Your disk quota; null: unlimited")


class QuotaView(BaseModel):
    limit: float | None = Field(description="null: unlimited. Storage in MB")
    used: float
    resets_at: datetime | None = Field(description="When a daily quota starts again (00:00 UTC); null otherwise")
    source: str | None = Field(None, description="Storage: where its limit comes from (the server, your roles)")


class TokenCreate(BaseModel):
    name: str = Field(description="What the token is for, e.g. 'laptop scripts'")
    scopes: list[str] | None = Field(
        None, description="Permissions (resource:action, e.g. ['inference:list', 'inference:create']) the token is "
                          "limited to, each one you hold; null: your own permissions. Checked again at each request "
                          "against your permissions then")
    expires_in_days: float | None = Field(
        None, description=f"Days until the token stops working (more than 0, at most {MAX_EXPIRY_DAYS}); null: "
                          "until revoked")


class TokenCreated(ApiTokenPublic):
    token: str = Field(description="The token itself: shown only in this answer, never again")


def build_router(tokens: TokenService, quota: DiskQuota, roles: RoleService,
                 job_quotas: JobQuotas | None = None) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["account"])

    @router.get("/ping")
    def ping(user: CurrentUser) -> dict[str, Any]:
        """Health check in ESD's shape (``{"message": "pong", "statusCode": 200}``)."""
        return {"message": "pong", "statusCode": 200}

    @router.get("/me")
    def me(user: CurrentUser) -> Me:
        return Me(id=user.id, username=user.username, roles=roles.roles_of([user.id])[user.id],
                  permissions=compact(user.permissions), is_admin=user.is_admin, language=user.language,
                  created_at=user.created_at)

    @router.get("/me/disk")
    def disk(user: CurrentUser) -> DiskUse:
        """What you store against your disk quota; over it, new jobs and model uploads get 413 (``quota``)."""
        usage = quota.usage(actor=user)
        return DiskUse(used_bytes=usage.used, limit_bytes=usage.limit)

    @router.get("/me/quotas")
    def quotas(user: CurrentUser) -> dict[str, QuotaView]:
        """Your quotas (the most generous of your roles'; storage also the server's) and what you use of them:
        ``max_queued_jobs``, ``max_jobs_per_day``, ``max_gpu_seconds_per_day``, ``max_storage_mb``. A job over one
        of the job quotas is refused with 429 naming it (with ``Retry-After`` for the daily ones)."""
        uses = job_quotas.usage(actor=user) if job_quotas is not None else []
        return {u.name: QuotaView(limit=u.limit, used=u.used, resets_at=u.resets_at, source=u.source) for u in uses}

    @router.get("/tokens")
    def list_tokens(user: CurrentUser, include_revoked: bool = True) -> list[ApiTokenPublic]:
        """The caller's own API tokens (never the tokens themselves)."""
        return tokens.list_tokens(actor=user, include_revoked=include_revoked)

    @router.post("/tokens", status_code=status.HTTP_201_CREATED)
    def create_token(user: CurrentUser, body: TokenCreate, made_with: TokenExpiry) -> TokenCreated:
        """A new personal token; send it as ``Authorization: Bearer <token>``. A scoped token works on the APIs
        only (the UI refuses it with 403). Made with an expiring token, it expires no later than that one."""
        token, public = tokens.create(actor=user, name=body.name, scopes=body.scopes,
                                      expires_in_days=body.expires_in_days, not_after=made_with)
        return TokenCreated(token=token, **public.model_dump())

    @router.delete("/tokens/{token_id}")
    def revoke_token(user: CurrentUser, token_id: str) -> ApiTokenPublic:
        """Revoke one of the caller's tokens; requests using it are refused from now on."""
        return tokens.revoke(actor=user, token_id=token_id)

    return router
