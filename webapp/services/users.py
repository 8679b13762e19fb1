"""User accounts: create, delete, reset password, list — admin only — and the first-start admin."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterable

from sqlmodel import col, delete, func, select

from webapp.db import Database
from webapp.records import LoginSession, Role, User, UserPublic, utcnow
from webapp.services.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from webapp.services.passwords import Passwords, check_password_policy
from webapp.services.tokens import revoke_all

log = logging.getLogger(__name__)

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
ADMIN_USERNAME = "admin"


def require_admin(actor: User) -> None:
    if not actor.is_admin:
        raise PermissionDenied(f"user {actor.username!r} is not an administrator")


def usernames(db: Database, ids: Iterable[int | None]) -> dict[int, str]:
    """User id → username for the given owner ids (None skipped), in one query."""
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    with db.read() as s:
        return {u.id: u.username for u in s.exec(select(User).where(col(User.id).in_(wanted)))}  # type: ignore[misc]


def check_username(username: str) -> str:
    username = username.strip()
    if not USERNAME_RE.match(username):
        raise InvalidInput(
            f"`username` {username!r} is invalid: 1-64 characters, letters, digits, '_', '.', '@', '-', "
            "starting with a letter or digit",
            field="username",
        )
    return username


class UserService:
    def __init__(self, db: Database, passwords: Passwords) -> None:
        self._db = db
        self._passwords = passwords

    # -- lookups (no authorisation: used by authentication itself) ---------------------------------
    def get(self, user_id: int) -> User | None:
        with self._db.read() as s:
            return s.get(User, user_id)

    def get_by_name(self, username: str) -> User | None:
        if "\x00" in username:  # no user has one, and PostgreSQL refuses it even in a query (500 on a login form)
            return None
        with self._db.read() as s:
            return s.exec(select(User).where(User.username == username)).first()

    # -- admin operations ---------------------------------------------------------------------------
    def list_users(self, *, actor: User) -> list[UserPublic]:
        require_admin(actor)
        with self._db.read() as s:
            users = s.exec(select(User).order_by(User.username)).all()
        return [UserPublic.model_validate(u, from_attributes=True) for u in users]

    def create_user(self, *, actor: User, username: str, password: str, role: Role | str = Role.USER) -> User:
        require_admin(actor)
        return self._create(username, password, role)

    def delete_user(self, *, actor: User, username: str) -> None:
        require_admin(actor)
        if username == actor.username:
            raise InvalidInput("you cannot delete your own account", field="username")
        with self._db.write() as s:
            user = s.exec(select(User).where(User.username == username)).first()
            if user is None:
                raise NotFound(f"no user named {username!r}", field="username")
            if user.is_admin:
                admins = s.exec(select(func.count()).select_from(User).where(User.role == Role.ADMIN)).one()
                if admins <= 1:
                    raise Conflict("cannot delete the last administrator", field="username")
            s.exec(delete(LoginSession).where(LoginSession.user_id == user.id))
            s.delete(user)
        log.info("user %s deleted by %s", username, actor.username)

    def reset_password(self, *, actor: User, username: str, new_password: str, revoke_tokens: bool = True) -> None:
        """Set a new password and end every session of that user (they must log in again); unless
        ``revoke_tokens`` is false, their API tokens are revoked too."""
        require_admin(actor)
        check_password_policy(new_password)
        password_hash = self._passwords.hash(new_password)
        with self._db.write() as s:
            user = s.exec(select(User).where(User.username == username)).first()
            if user is None:
                raise NotFound(f"no user named {username!r}", field="username")
            user.password_hash = password_hash
            user.password_changed_at = utcnow()
            s.add(user)
            s.exec(delete(LoginSession).where(LoginSession.user_id == user.id))
            revoked = revoke_all(s, user.id) if revoke_tokens else 0
        log.info("password of %s reset by %s (%d API tokens revoked)", username, actor.username, revoked)

    # -- bootstrap ------------------------------------------------------------------------------------
    def has_admin(self) -> bool:
        with self._db.read() as s:
            return s.exec(select(User).where(User.role == Role.ADMIN)).first() is not None

    def ensure_admin(self, password: str | None) -> str | None:
        """Create the ``admin`` account on first start.

        Returns the generated password when none was configured (the caller shows it once), else None.
        """
        if self.has_admin():
            return None
        generated = None
        if password is None:
            generated = password = secrets.token_urlsafe(15)
        self._create(ADMIN_USERNAME, password, Role.ADMIN)
        log.info("created the %r account", ADMIN_USERNAME)
        return generated

    def _create(self, username: str, password: str, role: Role | str) -> User:
        username = check_username(username)
        check_password_policy(password)
        try:
            role = Role(role)
        except ValueError:
            raise InvalidInput(f"`role` must be one of {[r.value for r in Role]}, not {role!r}", field="role") from None
        user = User(username=username, role=role, password_hash=self._passwords.hash(password))
        with self._db.write() as s:
            if s.exec(select(User).where(User.username == username)).first() is not None:
                raise Conflict(f"a user named {username!r} already exists", field="username")
            s.add(user)
            s.flush()
            s.refresh(user)
        return user
