"""Per-user API tokens: create (shown once), list, revoke, and resolve a Bearer token to its user.

Scripts and editors should not hold a user's password: a token can be revoked on its own, names
what it is for, and records when it was last used. Tokens are ``stk_`` + 43 url-safe characters
(256 random bits); only their sha256 is stored.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import timedelta

from sqlmodel import Session, func, select, update

from webapp.db import Database
from webapp.records import ApiToken, ApiTokenPublic, User, utcnow
from webapp.services.errors import Conflict, InvalidInput, NotFound

log = logging.getLogger(__name__)

TOKEN_PREFIX = "stk_"
MAX_TOKENS_PER_USER = 50
MAX_NAME_LENGTH = 64
# ``last_used_at`` is refreshed at most this often per token: one write per request would serialise
# every API call behind SQLite's writer lock for a timestamp nobody needs to the second.
_TOUCH_INTERVAL = timedelta(minutes=1)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def looks_like_token(value: str) -> bool:
    return value.startswith(TOKEN_PREFIX) and 20 <= len(value) <= 128


def revoke_all(s: Session, user_id: int) -> int:
    """Revoke every active token of a user inside the caller's write transaction (a password reset or
    change: a token minted with a leaked password must not outlive the reset); returns how many."""
    result = s.exec(update(ApiToken).where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
                    .values(revoked_at=utcnow()))
    return result.rowcount or 0


class TokenService:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, *, actor: User, name: str) -> tuple[str, ApiTokenPublic]:
        """A new token for ``actor``; the plain token is returned only here and never stored."""
        name = (name or "").strip()
        if not name:
            raise InvalidInput("`name` must say what the token is for (e.g. 'laptop scripts')", field="name")
        if len(name) > MAX_NAME_LENGTH:
            raise InvalidInput(f"`name` must be at most {MAX_NAME_LENGTH} characters", field="name")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = ApiToken(user_id=actor.id, name=name, token_hash=hash_token(token), prefix=token[:10])
        with self._db.write() as s:
            active = s.exec(select(func.count()).select_from(ApiToken).where(
                ApiToken.user_id == actor.id, ApiToken.revoked_at.is_(None))).one()
            if active >= MAX_TOKENS_PER_USER:
                raise Conflict(f"you already have {active} active tokens; revoke one first", field="name")
            s.add(row)
        log.info("API token %r (%s) created for %s", name, row.prefix, actor.username)
        return token, ApiTokenPublic.model_validate(row, from_attributes=True)

    def list_tokens(self, *, actor: User, include_revoked: bool = True) -> list[ApiTokenPublic]:
        """The caller's own tokens, newest first (admins too see only their own: tokens are personal)."""
        query = select(ApiToken).where(ApiToken.user_id == actor.id)
        if not include_revoked:
            query = query.where(ApiToken.revoked_at.is_(None))
        with self._db.read() as s:
            rows = s.exec(query.order_by(ApiToken.created_at.desc())).all()
        return [ApiTokenPublic.model_validate(r, from_attributes=True) for r in rows]

    def revoke(self, *, actor: User, token_id: str) -> ApiTokenPublic:
        """Revoke one of the caller's tokens (immediately: the next request with it gets 401)."""
        with self._db.write() as s:
            row = s.get(ApiToken, token_id)
            if row is None or row.user_id != actor.id:  # someone else's token is reported as absent
                raise NotFound(f"no API token with id {token_id!r}", field="token_id")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                s.add(row)
        log.info("API token %s revoked by %s", row.prefix, actor.username)
        return ApiTokenPublic.model_validate(row, from_attributes=True)

    def user_for_token(self, token: str) -> User | None:
        """The active user behind a Bearer token, or None when unknown or revoked."""
        if not looks_like_token(token):
            return None
        key = hash_token(token)
        with self._db.read() as s:
            row = s.exec(select(ApiToken, User).join(User).where(ApiToken.token_hash == key)).first()
        if row is None:
            return None
        record, user = row
        if record.revoked_at is not None:
            return None
        now = utcnow()
        if record.last_used_at is None or now - record.last_used_at > _TOUCH_INTERVAL:
            with self._db.write() as s:
                fresh = s.get(ApiToken, record.id)
                if fresh is not None:
                    fresh.last_used_at = now
                    s.add(fresh)
        return user
