"""Database tables (SQLModel). Importing this package registers every table on ``SQLModel.metadata``."""

from webapp.records.access import AccessRole, AuditEvent, RoleMember
from webapp.records.common import new_id, utcnow
from webapp.records.datasets import Dataset, DatasetItem
from webapp.records.imports import ImportTask, ScannedFile, TaskKind, TaskStatus, UploadSession, UploadStatus
from webapp.records.jobs import Endpoint, EndpointStatus, Job, JobMode, JobStatus
from webapp.records.models import ModelRecord, ModelStatus, ModelType, Visibility
from webapp.records.options import ServerOption, UserOption
from webapp.records.quotas import QuotaUsage
from webapp.records.tokens import ApiToken, ApiTokenPublic
from webapp.records.users import LoginAttempt, LoginSession, User, UserPublic

__all__ = [
    "AccessRole", "AuditEvent", "RoleMember",
    "Dataset", "DatasetItem",
    "Endpoint", "EndpointStatus", "Job", "JobMode", "JobStatus",
    "ApiToken", "ApiTokenPublic", "QuotaUsage", "ServerOption", "UserOption",
    "LoginAttempt", "LoginSession", "ModelRecord", "ModelStatus", "ModelType", "User", "UserPublic", "Visibility",
    "new_id", "utcnow",
    "ImportTask", "ScannedFile", "TaskKind", "TaskStatus", "UploadSession", "UploadStatus",
]
