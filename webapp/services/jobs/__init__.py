"""Jobs: the persistent queue, the dispatchers that feed backends, and ``JobService`` in front of both.

Every generation — UI, /sdapi/v1, /api/v1 — is ``JobService.submit``; nothing runs a model any other way.
"""

from webapp.services.jobs.board import JobBoard
from webapp.services.jobs.dispatcher import Dispatcher
from webapp.services.jobs.endpoint_admin import Deployment, EndpointAdmin
from webapp.services.jobs.endpoints import EndpointService
from webapp.services.jobs.fleet import Fleet
from webapp.services.jobs.queue import JobQueue
from webapp.services.jobs.service import JobService, ProgressSnapshot
from webapp.services.jobs.setup import LOCAL_ENDPOINT, Jobs, build_jobs

__all__ = [
    "LOCAL_ENDPOINT", "Deployment", "Dispatcher", "EndpointAdmin", "EndpointService", "Fleet", "JobBoard",
    "JobQueue", "JobService", "Jobs", "ProgressSnapshot", "build_jobs",
]
