"""User accounts: create, delete, reset password, list (``user:*`` permissions), the UI language each user
chose, and the first-start admin. Roles are given with ``webapp.services.roles``."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterable, Sequence

from sqlmodel import Session, col, delete, select, update

from webapp.db import Database
from webapp.i18n import LANGUAGES
from webapp.records import AccessRole, LoginSession, RoleMember, User, UserPublic, utcnow
from webapp.services import audit
from webapp.services.access import ALL_PERMISSIONS, authorize
from webapp.services.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from webapp.services.passwords import Passwords, check_password_policy
from webapp.services.roles import (
    default_roles,
    ensure_an_admin_remains,
    refresh_users,
    resolve_roles,
    role_permissions,
    set_member_roles,
)
from webapp.services.tokens import revoke_all

log = logging.getLogger(__name__)

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
ADMIN_USERNAME = "admin"
LEGACY_ROLES = {"admin": "admin", "user": "designer"}
"""The two roles of earlier releases (API ``role``) → the seeded role (``AccessRole.builtin``) they became."""


def check_language(language: str | None) -> str | None:
    if language in (None, "", "auto"):
        return None
    if language not in LANGUAGES:
        raise InvalidInput(f"`language` must be one of {list(LANGUAGES)} (or empty: the browser's), not "
                           f"{language!r}", field="language")
    return language


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
        authorize(actor, "user:list")
        with self._db.read() as s:
            users = s.exec(select(User).order_by(User.username)).all()
            names = {r.id: r.name for r in s.exec(select(AccessRole))}
        return [UserPublic.model_validate(u, from_attributes=True).model_copy(
            update={"roles": sorted(names[i] for i in u.role_ids if i in names)}) for u in users]

    def create_user(self, *, actor: User, username: str, password: str, role: str | None = None,
                    roles: Sequence[str | int] | None = None) -> User:
        """A new account with ``roles`` (names or ids; default: the seeded Designer role). ``role`` is the
        earlier releases' ``admin`` / ``user``. The actor must hold every permission the roles grant."""
        authorize(actor, "user:create")
        return self._create(username, password, role=role, roles=roles, actor=actor)

    def delete_user(self, *, actor: User, username: str) -> None:
        authorize(actor, "user:delete")
        if username == actor.username:
            raise InvalidInput("you cannot delete your own account", field="username")
        with self._db.write() as s:
            user = s.exec(select(User).where(User.username == username)).first()
            if user is None:
                raise NotFound(f"no user named {username!r}", field="username")
            if not user.permissions <= actor.permissions:
                raise PermissionDenied(f"you can only delete users whose permissions you hold; {username!r} has "
                                       "more", field="username")
            s.exec(delete(LoginSession).where(LoginSession.user_id == user.id))
            s.delete(user)
            s.flush()
            try:
                ensure_an_admin_remains(s)
            except Conflict:
                raise Conflict("cannot delete the last administrator", field="username") from None
            audit.record(s, actor, "user.delete", username)
        log.info("user %s deleted by %s", username, actor.username)

    def set_language(self, *, actor: User, language: str | None) -> str | None:
        """The caller's own UI language (None: follow the browser)."""
        language = check_language(language)
        with self._db.write() as s:
            user = s.get(User, actor.id)
            if user is None:
                raise NotFound("your account no longer exists", field="username")
            user.language = language
            s.add(user)
        return language

    def reset_password(self, *, actor: User, username: str, new_password: str, revoke_tokens: bool = True) -> None:
        """Set a new password and end every session of that user (they must log in again); unless
        ``revoke_tokens`` is false, their API tokens are revoked too."""
        authorize(actor, "user:update")
        check_password_policy(new_password)
        password_hash = self._passwords.hash(new_password)
        with self._db.write() as s:
            user = s.exec(select(User).where(User.username == username)).first()
            if user is None:
                raise NotFound(f"no user named {username!r}", field="username")
            if not user.permissions <= actor.permissions:
                raise PermissionDenied(f"you can only reset the password of users whose permissions you hold; "
                                       f"{username!r} has more", field="username")
            user.password_hash = password_hash
            user.password_changed_at = utcnow()
            s.add(user)
            s.exec(delete(LoginSession).where(LoginSession.user_id == user.id))
            revoked = revoke_all(s, user.id) if revoke_tokens else 0
            audit.record(s, actor, "user.password_reset", username, tokens_revoked=revoked)
        log.info("password of %s reset by %s (%d API tokens revoked)", username, actor.username, revoked)

    def rehash_if_needed(self, user: User, password: str) -> bool:
        """After ``password`` was verified for ``user``: store a new hash when the stored one was made with other
        argon2 parameters than the configured ones. Not a password change: sessions and tokens stay; True when
        rewritten."""
        if not user.password_hash or not self._passwords.needs_rehash(user.password_hash):
            return False
        fresh = self._passwords.hash(password)
        with self._db.write() as s:  # only if the hash is still the one verified (no reset in between)
            rewritten = s.exec(update(User).where(  # type: ignore[call-overload]
                User.id == user.id, User.password_hash == user.password_hash).values(password_hash=fresh)).rowcount
        if rewritten:
            log.info("password hash of %s re-made with the configured argon2 parameters", user.username)
        return bool(rewritten)

    # -- bootstrap ------------------------------------------------------------------------------------
    def has_admin(self) -> bool:
        with self._db.read() as s:
            return any(u.permissions >= ALL_PERMISSIONS for u in s.exec(select(User)))

    def ensure_admin(self, password: str | None) -> str | None:
        """Create the ``admin`` account on first start.

        Returns the generated password when none was configured (the caller shows it once), else None.
        """
        if self.has_admin():
            return None
        generated = None
        if password is None:
            generated = password = secrets.token_urlsafe(15)
        self._create(ADMIN_USERNAME, password, role="admin")
        log.info("created the %r account", ADMIN_USERNAME)
        return generated

    def _create(self, username: str, password: str, *, role: str | None = None,
                roles: Sequence[str | int] | None = None, actor: User | None = None) -> User:
        username = check_username(username)
        check_password_policy(password)
        if role is not None and roles is not None:
            raise InvalidInput("give `roles` (names) or the older `role`, not both", field="roles")
        user = User(username=username, password_hash=self._passwords.hash(password))
        with self._db.write() as s:
            if s.exec(select(User).where(User.username == username)).first() is not None:
                raise Conflict(f"a user named {username!r} already exists", field="username")
            wanted = self._wanted_roles(s, role, roles)
            s.add(user)
            s.flush()
            if actor is None:  # bootstrap: the first admin is given its roles by the studio itself
                for found in wanted:
                    s.add(RoleMember(user_id=user.id, role_id=found.id))
                s.flush()
                refresh_users(s, [user.id])
            else:
                set_member_roles(s, actor, user, wanted)
            audit.record(s, actor, "user.create", username, roles=sorted(r.name for r in wanted))
            s.flush()
            s.refresh(user)
        return user

    @staticmethod
    def _wanted_roles(s: Session, role: str | None, roles: Sequence[str | int] | None) -> list[AccessRole]:
        if roles is not None:
            return resolve_roles(s, list(roles))
        if role is None:
            return default_roles(s)
        key = LEGACY_ROLES.get(str(role).strip().lower())
        if key is None:  # a role's name works here too
            return resolve_roles(s, [role], field="role")
        found = s.exec(select(AccessRole).where(AccessRole.builtin == key)).first()
        if key == "admin" and (found is None or not role_permissions(found) >= ALL_PERMISSIONS):
            found = next((r for r in s.exec(select(AccessRole)) if role_permissions(r) >= ALL_PERMISSIONS), None)
        if found is None:
            raise InvalidInput(f"`role` {role!r}: its role no longer exists; name one of the roles", field="role")
        return [found]
