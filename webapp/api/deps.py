"""FastAPI dependencies shared by the routers."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request

from webapp.records import User
from webapp.services.errors import NotAuthenticated
from webapp.web.gate import scope_token_expiry, scope_user


def current_user(request: Request) -> User:
    """The caller, as identified by the authentication gate (cookie, Basic or Bearer)."""
    user = scope_user(request.scope)
    if user is None:  # the gate lets no anonymous request through; this is the belt to its braces
        raise NotAuthenticated("Not authenticated")
    return user


CurrentUser = Annotated[User, Depends(current_user)]


def token_expiry(request: Request) -> datetime | None:
    """When the API token this request came with expires (None: no token, or one without an expiry)."""
    return scope_token_expiry(request.scope)


TokenExpiry = Annotated[datetime | None, Depends(token_expiry)]
