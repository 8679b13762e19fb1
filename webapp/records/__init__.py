"""Database tables (SQLModel). Importing this package registers every table on ``SQLModel.metadata``."""

from webapp.records.common import utcnow
from webapp.records.users import LoginSession, Role, User, UserPublic

__all__ = ["LoginSession", "Role", "User", "UserPublic", "utcnow"]
