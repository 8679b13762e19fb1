"""Per-user API tokens: create (shown once), list, revoke, and resolve a Bearer token to its user.

Scripts and editors should not hold a user's password: a token can be revoked on its own, names
what it is for, and records when it was last used. Tokens are ``stk_`` + 43 url-safe characters
(256 random bits); only their sha256 is stored.

A token may be limited to *scopes* (permissions, a subset of its owner's when it is made) and may
expire (at most ``MAX_EXPIRY_DAYS`` ahead). Each request with it acts as the owner *narrowed* to the
scopes: the intersection with the owner's current permissions, so taking a role away from the owner also
narrows their old tokens. An expired token is refused like a revoked one. Creating and revoking tokens
is written to the audit log (never the token itself).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, func, select, update

from webapp.db import Database
from webapp.records import ApiToken, ApiTokenPublic, User, utcnow
from webapp.services import audit
from webapp.services.access import compact, expand, parse_permissions
from webapp.services.errors import Conflict, InvalidInput, NotAuthenticated, NotFound, PermissionDenied

log = logging.getLogger(__name__)

TOKEN_PREFIX = "stk_"
MAX_TOKENS_PER_USER = 50
MAX_NAME_LENGTH = 64
MAX_EXPIRY_DAYS = 365
"""The furthest a token's expiry may lie ahead: a forgotten token in a script should not live for ever
when its owner chose to bound it (a token with no expiry stays possible, for servers' own scripts)."""
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


@dataclass(frozen=True)
class TokenIdentity:
    """Who a Bearer token acts as: ``user`` is already narrowed to ``scopes`` (None: an unscoped token)."""

    user: User
    scopes: frozenset[str] | None
    expires_at: datetime | None = None
    """When the token stops working (None: until revoked); a token it makes never outlives it."""


def check_scopes(actor: User, owner: User, scopes: Iterable[str] | None) -> list[str] | None:
    """The scopes to store (compact), or None for the owner's permissions.

    Each scope must be held by ``actor`` (the caller, possibly itself a scoped token). A caller narrower than
    the account (a scoped token making a token) must name scopes: an unscoped token would hold the owner's
    every permission, more than the token that made it."""
    if scopes is None:
        if not actor.permissions >= owner.permissions:
            raise PermissionDenied("a scoped API token can only create tokens with `scopes` within its own",
                                   field="scopes")
        return None
    if isinstance(scopes, str):
        raise InvalidInput("`scopes` must be a list of permissions (resource:action)", field="scopes")
    wanted = parse_permissions(scopes, field="scopes")
    if not wanted:
        raise InvalidInput("`scopes` must name at least one permission (or be left out: the owner's permissions)",
                           field="scopes")
    lacking = compact(expand(wanted) - actor.permissions)
    if lacking:
        raise PermissionDenied(f"`scopes` must be within your own permissions: you lack {lacking}", field="scopes")
    return compact(wanted)


def check_expiry(expires_in_days: float | None, expires_at: datetime | None) -> datetime | None:
    """When the token stops working (aware UTC), at most ``MAX_EXPIRY_DAYS`` ahead; None: never."""
    if expires_in_days is not None and expires_at is not None:
        raise InvalidInput("give `expires_in_days` or `expires_at`, not both", field="expires_in_days")
    now = utcnow()
    if expires_in_days is not None:
        if isinstance(expires_in_days, bool) or not isinstance(expires_in_days, int | float):
            raise InvalidInput(f"`expires_in_days` must be a number of days, not {expires_in_days!r}",
                               field="expires_in_days")
        if not 0 < expires_in_days <= MAX_EXPIRY_DAYS:
            raise InvalidInput(f"`expires_in_days` must be more than 0 and at most {MAX_EXPIRY_DAYS}, not "
                               f"{expires_in_days}", field="expires_in_days")
        return now + timedelta(days=expires_in_days)
    if expires_at is None:
        return None
    if expires_at.tzinfo is None:
        raise InvalidInput("`expires_at` must name its time zone (e.g. 2030-01-01T00:00:00Z)", field="expires_at")
    if expires_at <= now:
        raise InvalidInput(f"`expires_at` must be in the future, not {expires_at.isoformat()}", field="expires_at")
    if expires_at > now + timedelta(days=MAX_EXPIRY_DAYS):
        raise InvalidInput(f"`expires_at` must be at most {MAX_EXPIRY_DAYS} days ahead", field="expires_at")
    return expires_at


def _public(row: ApiToken) -> ApiTokenPublic:
    return ApiTokenPublic(id=row.id, name=row.name, prefix=row.prefix, created_at=row.created_at,
                          last_used_at=row.last_used_at, revoked_at=row.revoked_at, expires_at=row.expires_at,
                          scopes=row.scopes)


class TokenService:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, *, actor: User, name: str, scopes: Iterable[str] | None = None,
               expires_in_days: float | None = None, expires_at: datetime | None = None,
               not_after: datetime | None = None) -> tuple[str, ApiTokenPublic]:
        """A new token for ``actor``; the plain token is returned only here and never stored.

        ``scopes`` (permissions within the caller's) limit what it may do, None: the owner's permissions;
        ``expires_in_days`` or ``expires_at`` bound its life (at most ``MAX_EXPIRY_DAYS``), None: until revoked;
        ``not_after`` (the expiry of the token the caller used) caps it: a token never outlives the one that made it."""
        name = (name or "").strip()
        if not name:
            raise InvalidInput("`name` must say what the token is for (e.g. 'laptop scripts')", field="name")
        if len(name) > MAX_NAME_LENGTH:
            raise InvalidInput(f"`name` must be at most {MAX_NAME_LENGTH} characters", field="name")
        expiry = check_expiry(expires_in_days, expires_at)
        if not_after is not None and (expiry is None or expiry > not_after):
            expiry = not_after
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._db.write() as s:
            owner = s.get(User, actor.id)
            if owner is None:
                raise NotAuthenticated("your account no longer exists")
            stored_scopes = check_scopes(actor, owner, scopes)
            active = s.exec(select(func.count()).select_from(ApiToken).where(
                ApiToken.user_id == actor.id, ApiToken.revoked_at.is_(None))).one()
            if active >= MAX_TOKENS_PER_USER:
                raise Conflict(f"you already have {active} active tokens; revoke one first", field="name")
            row = ApiToken(user_id=actor.id, name=name, token_hash=hash_token(token), prefix=token[:10],
                           expires_at=expiry,
                           scopes_json=None if stored_scopes is None else json.dumps(stored_scopes))
            s.add(row)
            s.flush()
            audit.record(s, actor, "token.create", actor.username, name=name, token_id=row.id, scopes=stored_scopes,
                         expires_at=expiry)
            public = _public(row)
        log.info("API token %r (%s) created for %s", name, public.prefix, actor.username)
        return token, public

    def list_tokens(self, *, actor: User, include_revoked: bool = True) -> list[ApiTokenPublic]:
        """The caller's own tokens, newest first (admins too see only their own: tokens are personal)."""
        query = select(ApiToken).where(ApiToken.user_id == actor.id)
        if not include_revoked:
            query = query.where(ApiToken.revoked_at.is_(None))
        with self._db.read() as s:
            rows = s.exec(query.order_by(ApiToken.created_at.desc())).all()
        return [_public(r) for r in rows]

    def revoke(self, *, actor: User, token_id: str) -> ApiTokenPublic:
        """Revoke one of the caller's tokens (immediately: the next request with it gets 401)."""
        with self._db.write() as s:
            row = s.get(ApiToken, token_id)
            if row is None or row.user_id != actor.id:  # someone else's token is reported as absent
                raise NotFound(f"no API token with id {token_id!r}", field="token_id")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                s.add(row)
                audit.record(s, actor, "token.revoke", actor.username, name=row.name, token_id=row.id)
            public = _public(row)
        log.info("API token %s revoked by %s", public.prefix, actor.username)
        return public

    def identify(self, token: str) -> TokenIdentity | None:
        """Who a Bearer token acts as, or None when unknown or revoked; raises ``NotAuthenticated`` when
        it has expired. A scoped token's user is narrowed to its scopes (within the owner's permissions
        now, so a role taken away also narrows old tokens)."""
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
        if record.expires_at is not None and record.expires_at <= now:
            raise NotAuthenticated("expired API token")
        if record.last_used_at is None or now - record.last_used_at > _TOUCH_INTERVAL:
            with self._db.write() as s:
                fresh = s.get(ApiToken, record.id)
                if fresh is not None:
                    fresh.last_used_at = now
                    s.add(fresh)
        scopes = record.scopes
        if scopes is None:
            return TokenIdentity(user=user, scopes=None, expires_at=record.expires_at)
        allowed = frozenset(scopes)
        return TokenIdentity(user=user.narrowed(allowed), scopes=allowed, expires_at=record.expires_at)
