"""Service errors, translated to HTTP statuses and ``gr.Error`` only at the edge."""

from __future__ import annotations

from datetime import datetime


class ServiceError(Exception):
    """Base class; ``status`` is the HTTP status the edge should answer with."""

    status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(ServiceError):
    status = 422


class NotAuthenticated(ServiceError):
    status = 401


class PermissionDenied(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Throttled(ServiceError):
    status = 429

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JobQuotaExceeded(ServiceError):
    """429: one of the user's role quotas on jobs is used up (``field`` names it: ``max_jobs_per_day`` …).

    ``resets_at``/``retry_after`` say when it frees: the daily ones at 00:00 UTC; the queued-jobs quota frees as
    the user's jobs finish, a time nobody knows (both None). The disk quota stays ``quota.QuotaExceeded`` (413)."""

    status = 429

    def __init__(self, message: str, *, quota: str, resets_at: datetime | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message, field=quota)
        self.quota = quota
        self.resets_at = resets_at
        self.retry_after = retry_after


class Unavailable(ServiceError):
    """503: the request is fine but something the server depends on (the asset store) failed; retry later."""

    status = 503
