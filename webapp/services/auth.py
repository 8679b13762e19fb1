"""Authentication: password logins, database-backed sessions, logout.

Sessions live in the database, so a restart does not log anyone out; the cookie carries a random
token and only its sha256 is stored.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import timedelta

from sqlmodel import delete, select

from webapp.db import Database
from webapp.records import LoginSession, User, utcnow
from webapp.services.errors import NotAuthenticated
from webapp.services.passwords import Passwords
from webapp.services.throttle import LoginThrottle
from webapp.services.users import UserService

log = logging.getLogger(__name__)

# Refresh last_seen (one write) at most this often per session, not on every request.
_TOUCH_INTERVAL = timedelta(minutes=5)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AuthService:
    def __init__(
        self, db: Database, users: UserService, passwords: Passwords, throttle: LoginThrottle,
        *, session_ttl: timedelta,
    ) -> None:
        self._db = db
        self._users = users
        self._passwords = passwords
        self._throttle = throttle
        self._ttl = session_ttl

    @property
    def session_ttl(self) -> timedelta:
        return self._ttl

    def verify_password(self, username: str, password: str, *, client_address: str | None) -> User:
        """Check credentials under the rate limit; raises Throttled or NotAuthenticated."""
        username = username.strip()
        self._throttle.check(username, client_address)
        user = self._users.get_by_name(username) if username else None
        if not self._passwords.verify(user.password_hash if user else None, password) or user is None:
            self._throttle.record_failure(username, client_address)
            log.warning("failed login for %r from %s", username, client_address)
            raise NotAuthenticated("Incorrect username or password")
        self._throttle.record_success(username)
        return user

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
