"""Service errors, translated to HTTP statuses and ``gr.Error`` only at the edge."""

from __future__ import annotations


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


class Unavailable(ServiceError):
    """503: the request is fine but something the server depends on (the asset store) failed; retry later."""

    status = 503
