"""Database tables (SQLModel). Importing this package registers every table on ``SQLModel.metadata``."""

from webapp.records.common import new_id, utcnow
from webapp.records.models import ModelRecord, ModelStatus, ModelType, Visibility
from webapp.records.users import LoginSession, Role, User, UserPublic

__all__ = [
    "LoginSession", "ModelRecord", "ModelStatus", "ModelType", "Role", "User", "UserPublic", "Visibility",
    "new_id", "utcnow",
]
