"""Deploying and deleting endpoints (administrators), for the Endpoints tab and ``/api/v1/endpoints``.

A deployment is validated in full before anything is stored: the name (SageMaker's rule, so the same name
can later name a SageMaker endpoint), the kind (one with an options model), its options through that
model (``deploy.backends.options``: the form and the API validate the same way), and the instance bounds.
The row is then recorded ``Creating`` — the options' secret fields encrypted in their own column, never in
``config_json`` — and the fleet builds and attaches the backend, leaving it ``InService`` or ``Failed``
with the reason.

Deleting stops the endpoint's dispatcher (running jobs go back to the queue without being charged an
attempt) and moves every job queued for it to the default endpoint, so no job is lost; then the row goes.
The default endpoint (``local``, written from the settings at every start) cannot be deleted.
"""

from __future__ import annotations

import json
import logging
import re
import secrets as random_tokens
from dataclasses import dataclass
from typing import Any

from deploy.backends.options import OptionsError, option_kinds, parse_options, plain_options, secret_fields
from webapp.records import Endpoint, EndpointStatus, User
from webapp.services.access import authorize
from webapp.services.errors import Conflict, InvalidInput, Unavailable
from webapp.services.jobs.endpoints import EndpointService
from webapp.services.jobs.fleet import LOCAL_ENDPOINT, Fleet
from webapp.services.jobs.queue import JobQueue
from webapp.services.jobs.service import JobService
from webapp.services.secrets import SecretBox
from webapp.services.text import check_text

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
"""Lower-case letters, digits and hyphens, starting with a letter or digit, at most 63 characters: valid as
a SageMaker endpoint name and in a URL path."""
MAX_INSTANCES = 100
MASK = "********"


@dataclass(frozen=True)
class Deployment:
    """What an administrator asks for; ``options`` are the kind's own (validated by its options model)."""

    kind: str
    options: dict[str, Any]
    name: str | None = None
    min_instances: int = 1
    max_instances: int = 1
    autoscale: bool | None = None
    """None: the kind's default (on for SageMaker, off otherwise)."""
    allowed_roles: tuple[str | int, ...] = ()
    """Role names (or ids) whose users may see and use the endpoint; empty: every holder of ``endpoint:use``."""


def shown_config(endpoint: Endpoint) -> dict[str, Any]:
    """The endpoint's options as administrators may see them: secret fields present but masked."""
    config = endpoint.config
    for name in secret_fields(endpoint.kind):
        if endpoint.secrets_token or config.get(name):
            config[name] = MASK
    return config


def _count(value: Any, field: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INSTANCES:
        raise InvalidInput(f"`{field}` must be a whole number from 0 to {MAX_INSTANCES}, not {value!r}", field=field)
    return value


class EndpointAdmin:
    def __init__(self, *, endpoints: EndpointService, fleet: Fleet, jobs: JobService, queue: JobQueue,
                 secrets: SecretBox, configured_backend: str) -> None:
        self._endpoints = endpoints
        self._fleet = fleet
        self._jobs = jobs
        self._queue = queue
        self._secrets = secrets
        self._configured_backend = configured_backend

    def kinds(self) -> list[str]:
        """What may be deployed: every kind with an options model; ``fake`` (deterministic pictures, no
        model) only on a server whose own backend is ``fake`` (tests, demos)."""
        return [k for k in option_kinds() if k != "fake" or self._configured_backend == "fake"]

    # -- deploy ---------------------------------------------------------------------------------------------
    def deploy(self, *, actor: User, request: Deployment) -> Endpoint:
        authorize(actor, "endpoint:create")
        check_text({"name": request.name, "kind": request.kind, "options": request.options})
        kind = request.kind
        if not isinstance(kind, str) or kind not in self.kinds():
            raise InvalidInput(f"`kind` must be one of {', '.join(self.kinds())}, not {kind!r}", field="kind")
        if not isinstance(request.options, dict):
            raise InvalidInput("`options` must be an object of the kind's options", field="options")
        try:
            parsed = parse_options(kind, request.options)
        except OptionsError as exc:
            raise InvalidInput(str(exc), field=exc.field) from None
        # Only what the administrator set is stored: the rest keeps following the model's defaults and the
        # server's (a deployed local endpoint finds this server's config skeletons, even after they move).
        options = {k: v for k, v in plain_options(parsed).items() if k in parsed.model_fields_set}
        low, high = _count(request.min_instances, "min_instances"), _count(request.max_instances, "max_instances")
        if high < 1 or low > high:
            raise InvalidInput(f"`max_instances` must be at least 1 and at least `min_instances` ({low}), not {high}",
                               field="max_instances")
        autoscale = parsed.default_autoscale if request.autoscale is None else request.autoscale
        if not isinstance(autoscale, bool):
            raise InvalidInput(f"`autoscale` must be true or false, not {request.autoscale!r}", field="autoscale")
        name = self._name(request.name, parsed.name_prefix(kind))
        roles = self._endpoints.encode_allowed_roles(request.allowed_roles)
        try:
            self._fleet.check_deployment(kind, options, name=name, bounds=(low, high, autoscale))
        except OptionsError as exc:
            raise InvalidInput(str(exc), field=exc.field) from None

        hidden = {key: str(options.pop(key)) for key in secret_fields(kind) if options.get(key) is not None}
        token = self._secrets.seal(hidden) if hidden else None
        self._endpoints.add(Endpoint(
            name=name, kind=kind, status=EndpointStatus.CREATING, config_json=json.dumps(options, default=str),
            secrets_token=token, min_instances=low, max_instances=high, autoscale=autoscale,
            allowed_roles=roles, owner_id=actor.id))
        status = self._fleet.start_endpoint(name, kind, {**options, **hidden}, bounds=(low, high, autoscale),
                                            provision=True)
        log.info("endpoint %s (%s) deployed by %s: %s", name, kind, actor.username, status)
        self._endpoints.audit(actor, "endpoint.deploy", name, kind=kind, status=str(status),
                              allowed_roles=self._endpoints.allowed_role_names(roles))
        deployed = self._endpoints.find(name)  # not `get`: the deployer need not be among its allowed roles
        if deployed is None:
            raise Conflict(f"endpoint {name!r} was removed while it was being deployed", field="name")
        return deployed

    def _name(self, name: Any, prefix: str) -> str:
        if name is None or name == "":
            return f"{prefix}-{random_tokens.token_hex(3)}"
        if not isinstance(name, str):
            raise InvalidInput("`name` must be a string", field="name")
        if not NAME_RE.fullmatch(name):
            raise InvalidInput(f"`name` must be 1 to 63 lower-case letters, digits or hyphens starting with a letter "
                               f"or digit, not {name!r}", field="name")
        if self._endpoints.find(name) is not None:
            raise Conflict(f"an endpoint named {name!r} already exists", field="name")
        return name

    # -- delete ---------------------------------------------------------------------------------------------
    def delete(self, *, actor: User, name: str, force: bool = False) -> int:
        """Remove ``name``: its running jobs are requeued (no attempt charged) and every job queued for it moves
        to the default endpoint. Returns how many jobs moved. A cloud endpoint (SageMaker) is deleted there too
        (endpoint, config, model, scaling); while jobs run on it the delete is refused unless ``force``."""
        return self.delete_many(actor=actor, names=[name], force=force)

    def delete_many(self, *, actor: User, names: list[str], force: bool = False) -> int:
        """Remove every endpoint in ``names`` (ESD deletes a list); all are checked before any goes."""
        authorize(actor, "endpoint:delete")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise InvalidInput("name at least one endpoint to delete", field="name")
        if not isinstance(force, bool):
            raise InvalidInput(f"`force` must be true or false, not {force!r}", field="force")
        for name in names:
            endpoint = self._endpoints.get(actor=actor, name=name)
            if endpoint.name == LOCAL_ENDPOINT or endpoint.is_default:
                raise Conflict(f"endpoint {name!r} is the default, configured by the server's settings; it cannot be "
                               "deleted", field="name")
            backend = self._fleet.backend(name)
            running = self._queue.running_on(name)
            if running and not force and backend is not None and backend.owns_cloud_resources:
                raise Conflict(f"{len(running)} job(s) run on endpoint {name!r} (e.g. {running[0]}); deleting it now "
                               "loses them — wait, cancel them, or delete with force", field="force")
        moved = 0
        for name in dict.fromkeys(names):
            moved_here = self._remove(name)
            log.info("endpoint %s deleted by %s; %d queued job(s) moved to the default endpoint", name,
                     actor.username, moved_here)
            self._endpoints.audit(actor, "endpoint.delete", name, jobs_moved=moved_here, force=force)
            moved += moved_here
        return moved

    def _remove(self, name: str) -> int:
        self._endpoints.set_status(name, EndpointStatus.DELETING)
        try:
            self._fleet.stop_endpoint(name, teardown=True)
        except Exception as exc:  # noqa: BLE001 - the cloud refused: say so, keep the row to try again
            log.error("endpoint %s: deleting what it created elsewhere failed: %s", name, exc)
            self._endpoints.set_status(name, EndpointStatus.FAILED, f"deleting it failed: {exc}")
            raise Unavailable(f"endpoint {name!r} could not be deleted where it runs: {exc}; try again",
                              field="name") from exc
        target = self._endpoints.default_name() or LOCAL_ENDPOINT
        moved = self._queue.move_queued(name, target)
        self._endpoints.remove(name)
        dispatcher = self._jobs.dispatchers().get(target)
        if dispatcher is not None:
            dispatcher.wake()
        return len(moved)

    def resume(self) -> None:
        """At start: finish deletions a stop interrupted (their jobs move, their rows go)."""
        for endpoint in self._endpoints.stored():
            if endpoint.status == EndpointStatus.DELETING and endpoint.name != LOCAL_ENDPOINT:
                moved = self._remove(endpoint.name)
                log.info("finished deleting endpoint %s (interrupted by a stop); %d job(s) moved", endpoint.name, moved)
