"""Authentication: password logins, database-backed sessions, logout.

Sessions live in the database, so a restart does not log anyone out; the cookie carries a random
token and only its sha256 is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from datetime import datetime, timedelta

from sqlmodel import delete, select

from webapp.db import Database
from webapp.records import LoginSession, User, utcnow
from webapp.services.errors import InvalidInput, NotAuthenticated
from webapp.services.passwords import Passwords, check_password_policy
from webapp.services.throttle import LoginThrottle
from webapp.services.tokens import TokenIdentity, TokenService, revoke_all
from webapp.services.users import UserService

log = logging.getLogger(__name__)

# Refresh last_seen (one write) at most this often per session, not on every request.
_TOUCH_INTERVAL = timedelta(minutes=5)
# Verified HTTP Basic credentials are remembered this long (see AuthService.verify_basic).
CREDENTIAL_CACHE_SECONDS = 60.0
CREDENTIAL_CACHE_SIZE = 1024


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AuthService:
    def __init__(
        self, db: Database, users: UserService, passwords: Passwords, throttle: LoginThrottle,
        *, session_ttl: timedelta, tokens: TokenService | None = None,
    ) -> None:
        self._db = db
        self._users = users
        self._passwords = passwords
        self._throttle = throttle
        self._ttl = session_ttl
        self._tokens = tokens
        # Basic auth sends the password on every request and argon2 costs ~50 ms by design, so a
        # script polling /progress would spend its time hashing. Verified credentials are cached
        # under an HMAC with a per-process random key (the cache never holds a password or a hash
        # that could be attacked offline), for a short time, and only while the user's
        # ``password_changed_at`` is unchanged: a password change, a reset or a deleted account
        # stops the cached login at once.
        self._cache_key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, tuple[int, datetime, float]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.credential_cache_seconds = CREDENTIAL_CACHE_SECONDS

    @property
    def session_ttl(self) -> timedelta:
        return self._ttl

    def verify_password(self, username: str, password: str, *, client_address: str | None) -> User:
        """Check credentials under the rate limit; raises Throttled or NotAuthenticated.

        The attempt is reserved before argon2 runs (see ``LoginThrottle``), so parallel guesses cannot
        outnumber the limit; only a correct password gives the reservation back."""
        username = username.strip()
        attempt = self._throttle.reserve(username, client_address)
        user = self._users.get_by_name(username) if username else None
        if not self._passwords.verify(user.password_hash if user else None, password) or user is None:
            log.warning("failed login for %r from %s", username, client_address)
            raise NotAuthenticated("Incorrect username or password")
        self._throttle.succeeded(attempt)
        self._users.rehash_if_needed(user, password)
        return user

    def verify_basic(self, username: str, password: str, *, client_address: str | None) -> User:
        """``verify_password`` with the short-lived verified-credential cache in front (HTTP Basic).

        A cache hit skips the failed-login throttle too: it proves the exact password was verified
        moments ago, so it cannot be a guess, and an attacker hammering the account must not lock
        out a script that already holds the right password.
        """
        key = hmac.new(self._cache_key, f"{username.strip()}\x00{password}".encode(), hashlib.sha256).digest()
        now = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(key)
        if hit is not None:
            user_id, changed_at, expires = hit
            user = self._users.get(user_id) if expires > now else None
            if user is not None and user.password_changed_at == changed_at:
                return user
            with self._cache_lock:
                self._cache.pop(key, None)
        user = self.verify_password(username, password, client_address=client_address)
        if self.credential_cache_seconds > 0:
            with self._cache_lock:
                self._cache[key] = (user.id, user.password_changed_at, now + self.credential_cache_seconds)
                self._cache.move_to_end(key)
                while len(self._cache) > CREDENTIAL_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return user

    def identify_api_token(self, token: str) -> TokenIdentity | None:
        """Who a personal API token (``Authorization: Bearer``) acts as, or None when unknown or revoked;
        raises ``NotAuthenticated`` ("expired API token") once it has expired. A scoped token's user is
        narrowed to its scopes (``TokenService.identify``)."""
        return self._tokens.identify(token) if self._tokens is not None and token else None

    def user_for_api_token(self, token: str) -> User | None:
        """The user behind a personal API token, narrowed to its scopes, or None (``identify_api_token``)."""
        identity = self.identify_api_token(token)
        return identity.user if identity is not None else None

    def forget_credentials(self, user_id: int | None = None) -> None:
        """Drop cached Basic credentials of one user (or everyone's)."""
        with self._cache_lock:
            if user_id is None:
                self._cache.clear()
                return
            for key in [k for k, v in self._cache.items() if v[0] == user_id]:
                del self._cache[key]

    def change_own_password(
        self, *, actor: User, current_password: str, new_password: str, keep_session: str | None = None,
        client_address: str | None = None, revoke_tokens: bool = True,
    ) -> None:
        """A user changes their own password: the current one is checked (under the throttle), every
        other session of theirs ends (``keep_session``, the one asking, stays), cached Basic credentials
        stop working and, unless ``revoke_tokens`` is false, their API tokens are revoked."""
        self.verify_password(actor.username, current_password, client_address=client_address)
        check_password_policy(new_password, field="new_password")
        if new_password == current_password:
            raise InvalidInput("`new_password` must differ from the current password", field="new_password")
        password_hash = self._passwords.hash(new_password)
        keep = token_hash(keep_session) if keep_session else None
        with self._db.write() as s:
            user = s.get(User, actor.id)
            if user is None:
                raise NotAuthenticated("your account no longer exists")
            user.password_hash = password_hash
            user.password_changed_at = utcnow()
            s.add(user)
            query = delete(LoginSession).where(LoginSession.user_id == actor.id)
            if keep:
                query = query.where(LoginSession.token_hash != keep)
            s.exec(query)
            revoked = revoke_all(s, actor.id) if revoke_tokens else 0
        self.forget_credentials(actor.id)
        log.info("%s changed their password (%d API tokens revoked)", actor.username, revoked)

    def login(
        self, username: str, password: str, *, client_address: str | None = None, user_agent: str | None = None,
    ) -> tuple[str, User]:
        """Verify and open a session; returns the cookie token and the user."""
        user = self.verify_password(username, password, client_address=client_address)
        token = secrets.token_urlsafe(32)
        now = utcnow()
        with self._db.write() as s:
            s.add(LoginSession(
                token_hash=token_hash(token), user_id=user.id, created_at=now, expires_at=now + self._ttl,
                last_seen_at=now, client_address=(client_address or "")[:64] or None,
                user_agent=(user_agent or "")[:256] or None,
            ))
        log.info("login: %s from %s", user.username, client_address)
        return token, user

    def user_for_token(self, token: str | None) -> User | None:
        """The user behind a session cookie, or None if unknown or expired."""
        if not token:
            return None
        key = token_hash(token)
        now = utcnow()
        with self._db.read() as s:
            row = s.exec(select(LoginSession, User).join(User).where(LoginSession.token_hash == key)).first()
        if row is None:
            return None
        session, user = row
        if session.expires_at <= now:
            self.logout(token)
            return None
        if now - session.last_seen_at > _TOUCH_INTERVAL:
            with self._db.write() as s:
                fresh = s.get(LoginSession, key)
                if fresh is not None:
                    fresh.last_seen_at = now
                    s.add(fresh)
        return user

    def logout(self, token: str | None) -> None:
        if not token:
            return
        with self._db.write() as s:
            s.exec(delete(LoginSession).where(LoginSession.token_hash == token_hash(token)))

    def purge_expired(self) -> int:
        with self._db.write() as s:
            result = s.exec(delete(LoginSession).where(LoginSession.expires_at <= utcnow()))
            return result.rowcount or 0
