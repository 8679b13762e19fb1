"""The endpoints running in this process: a backend and a dispatcher per endpoint row, while the server runs.

``JobService`` only queues and follows jobs; the fleet decides which endpoints have a running dispatcher.
It builds each backend through the registry from its row (kind + options), attaches a ``Dispatcher`` to the
service and detaches it again, so administrators can add and remove endpoints without a restart. A backend
that cannot be built leaves its endpoint ``Failed`` with the reason instead of stopping the server: the UI
and the queue stay up and say why jobs cannot run there.

A daemon thread asks every running backend ``health()`` every few seconds: an unhealthy one turns its
endpoint ``Degraded`` with the reason and its dispatcher claims nothing new (queued jobs wait, new submits
are still accepted), and it is ``InService`` again once healthy.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlmodel import select

from deploy.backends.base import BackendError
from deploy.backends.options import parse_options, secret_fields
from deploy.backends.registry import BackendConfig, create_backend
from deploy.storage import BlobStore
from webapp.db import Database
from webapp.records import Endpoint, EndpointStatus
from webapp.services.jobs.board import JobBoard
from webapp.services.jobs.dispatcher import Dispatcher
from webapp.services.jobs.endpoints import EndpointService
from webapp.services.jobs.queue import JobQueue
from webapp.services.jobs.service import JobService
from webapp.services.secrets import SecretBox, SecretsError

if TYPE_CHECKING:
    from deploy.model_files import ModelFiles

log = logging.getLogger(__name__)

LOCAL_ENDPOINT = "local"
"""The endpoint written from the settings at every start (the default; it cannot be deleted)."""


class Fleet:
    def __init__(self, *, db: Database, service: JobService, endpoints: EndpointService, queue: JobQueue,
                 store: BlobStore, board: JobBoard, model_files: ModelFiles | None, secrets: SecretBox,
                 kind_defaults: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """``kind_defaults``: options a kind's endpoints get unless their own say otherwise (a deployed
        ``local`` endpoint finds the server's config skeletons and annotators)."""
        self._db = db
        self._service = service
        self._endpoints = endpoints
        self._queue = queue
        self._store = store
        self._board = board
        self._model_files = model_files
        self._secrets = secrets
        self._kind_defaults = {kind: dict(values) for kind, values in (kind_defaults or {}).items()}
        self._stop_polling = threading.Event()
        self._poller: threading.Thread | None = None

    # -- building ---------------------------------------------------------------------------------------------
    def start_endpoint(self, name: str, kind: str, options: Mapping[str, Any], *, is_default: bool = False,
                       keep: EndpointStatus | None = None, bounds: tuple[int, int, bool] = (1, 1, False),
                       provision: bool = False) -> EndpointStatus:
        """Build ``name``'s backend from ``options`` (secrets included) and attach its dispatcher; the row says
        ``InService`` (or ``keep``, or what a cloud backend's ``status()`` says: ``Creating``) or ``Failed`` with
        the reason. The row records the options without their secret fields (those live only in its encrypted
        column). ``bounds``: the row's (min, max, autoscale); ``provision``: an administrator deploys it now (a cloud
        backend creates its resources; a restart only watches them)."""
        hidden = secret_fields(kind)
        recorded = {key: value for key, value in options.items() if key not in hidden}
        low, high, autoscale = bounds
        config = BackendConfig(name=name, kind=kind, options={**self._kind_defaults.get(kind, {}), **options},
                               model_files=self._model_files, store=self._store, min_instances=low,
                               max_instances=high, autoscale=autoscale, provision=provision)

        def failed(exc: Exception) -> EndpointStatus:
            self._endpoints.ensure(name=name, kind=kind, remote=False, capabilities={}, config=recorded,
                                   is_default=is_default, status=EndpointStatus.FAILED, error=str(exc))
            return EndpointStatus.FAILED

        try:
            backend = create_backend(config)
            caps, configured = backend.capabilities(), backend.is_configured()
            if configured:  # running before the row says so: a submit never finds it InService but not running
                self._service.attach(Dispatcher(endpoint=name, backend=backend, queue=self._queue,
                                                store=self._store, board=self._board))
        except (BackendError, ValueError, TypeError) as exc:
            log.error("the %s endpoint cannot run jobs: %s", name, exc)
            return failed(exc)
        except Exception as exc:  # noqa: BLE001 - becomes the endpoint's reason; traceback logged
            log.exception("the %s endpoint cannot run jobs", name)
            return failed(exc)
        status = (keep or EndpointStatus.IN_SERVICE) if configured else EndpointStatus.FAILED
        error = None if configured else f"the {kind} backend is not configured"
        cloud = _cloud_status(backend) if configured and keep is None else None
        if cloud is not None:
            status, error = cloud
        self._endpoints.ensure(
            name=name, kind=kind, remote=caps.remote, capabilities=caps.to_dict(), config=recorded,
            is_default=is_default, status=status, error=error)
        return status

    def check_deployment(self, kind: str, options: Mapping[str, Any], *, name: str,
                         bounds: tuple[int, int, bool]) -> None:
        """The kind's own deployment checks on ``options`` with the server's defaults for the kind applied and
        this studio's asset store (``BackendOptions.check_deployment``); raises ``OptionsError``."""
        parsed = parse_options(kind, {**self._kind_defaults.get(kind, {}), **options})
        low, high, autoscale = bounds
        parsed.check_deployment(name=name, min_instances=low, max_instances=high, autoscale=autoscale,
                                store=self._store)

    def stop_endpoint(self, name: str, timeout: float = 10.0, *, teardown: bool = False) -> bool:
        """Detach ``name``'s dispatcher (no new jobs are accepted for it) and stop it: running jobs go back to
        the queue without being charged an attempt. ``teardown`` (the endpoint is being deleted): then delete what
        its backend created elsewhere (a SageMaker endpoint), raising what that raised. False when nothing ran here."""
        dispatcher = self._service.detach(name)
        if dispatcher is None:
            if teardown:
                self._teardown_stored(name)
            return False
        dispatcher.stop(timeout)
        if teardown:
            dispatcher.backend.teardown()
        return True

    def _teardown_stored(self, name: str) -> None:
        """Teardown for an endpoint with no backend running here (its build failed, or a delete a stop
        interrupted): a backend is built from the row only to delete what it created elsewhere."""
        row = self._endpoints.find(name)
        if row is None or not row.remote:
            return
        options = json.loads(row.config_json or "{}")
        options.update(self._secrets.open(row.secrets_token) if row.secrets_token else {})
        config = BackendConfig(name=name, kind=row.kind, options={**self._kind_defaults.get(row.kind, {}), **options},
                               model_files=self._model_files, store=self._store, min_instances=row.min_instances,
                               max_instances=row.max_instances, autoscale=row.autoscale)
        try:
            backend = create_backend(config)
        except (BackendError, ValueError, TypeError) as exc:
            log.warning("endpoint %s: no backend to delete its resources with (%s); nothing deleted elsewhere", name,
                        exc)
            return
        backend.teardown()

    def backend(self, name: str) -> Any:
        """The backend running ``name`` here, or None."""
        dispatcher = self._service.dispatchers().get(name)
        return dispatcher.backend if dispatcher is not None else None

    def restore(self) -> None:
        """At start: every endpoint other than ``local`` recorded by earlier runs, rebuilt from its row with its
        secrets decrypted (one being deleted when the server stopped is left to ``EndpointAdmin.resume``)."""
        with self._db.read() as s:
            rows = list(s.exec(select(Endpoint).where(Endpoint.name != LOCAL_ENDPOINT,
                                                      Endpoint.status != EndpointStatus.DELETING)
                               .order_by(Endpoint.name)).all())
        for row in rows:
            try:
                options = json.loads(row.config_json or "{}")
            except ValueError:
                options = None
            if not isinstance(options, dict):
                self._endpoints.set_status(row.name, EndpointStatus.FAILED, "its stored configuration is not a JSON object")
                continue
            try:
                options.update(self._secrets.open(row.secrets_token) if row.secrets_token else {})
            except SecretsError as exc:
                log.error("the %s endpoint cannot run jobs: %s", row.name, exc)
                self._endpoints.set_status(row.name, EndpointStatus.FAILED, str(exc))
                continue
            # An administrator's Stopped survives a restart; anything else is re-checked now.
            keep = EndpointStatus.STOPPED if row.status == EndpointStatus.STOPPED else None
            self.start_endpoint(row.name, row.kind, options, is_default=row.is_default, keep=keep,
                                bounds=(row.min_instances, row.max_instances, row.autoscale))

    # -- health -------------------------------------------------------------------------------------------------
    def start(self, health_seconds: float) -> None:
        """Poll the running backends' health every ``health_seconds`` (0: never) until ``stop``."""
        if health_seconds <= 0 or self._poller is not None:
            return
        self._stop_polling.clear()

        def loop() -> None:
            while not self._stop_polling.wait(health_seconds):
                try:
                    self.poll_health()
                except Exception:  # noqa: BLE001 - a database hiccup must not end the polling
                    log.exception("endpoint health polling failed; polling again in %s s", health_seconds)

        self._poller = threading.Thread(target=loop, name="endpoint-health", daemon=True)
        self._poller.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_polling.set()
        if self._poller is not None:
            self._poller.join(timeout)
            self._poller = None

    def poll_health(self) -> None:
        """Ask every running backend once; hold or resume its dispatcher and record Degraded / InService."""
        for name, dispatcher in self._service.dispatchers().items():
            healthy, reason = _health(dispatcher)
            if healthy:
                if dispatcher.held:
                    dispatcher.resume()
            else:
                dispatcher.hold()
            row = self._endpoints.find(name)
            if row is None:
                continue
            if healthy:  # a remote worker says what it runs once it answers: the UI shows its own lists
                try:
                    current = dispatcher.backend.capabilities().to_dict()
                except Exception:  # noqa: BLE001 - capabilities are informative; health is what matters here
                    log.exception("endpoint %s: its capabilities could not be read", name)
                else:
                    if current != row.capabilities:
                        self._endpoints.set_capabilities(name, current)
            cloud = _cloud_status(dispatcher.backend)
            if cloud is not None:  # a cloud endpoint: SageMaker's status is the row's (Creating, InService, Failed)
                if row.status not in (EndpointStatus.STOPPED, EndpointStatus.DELETING) and \
                        (row.status, row.error) != cloud:
                    if cloud[0] != row.status:
                        log.info("endpoint %s is %s%s", name, cloud[0], f": {cloud[1]}" if cloud[1] else "")
                    self._endpoints.set_status(name, *cloud)
                continue
            if row.status not in (EndpointStatus.IN_SERVICE, EndpointStatus.DEGRADED):
                continue  # Creating, Stopped by an administrator, Deleting: their own state wins
            if not healthy and (row.status != EndpointStatus.DEGRADED or row.error != reason):
                if row.status != EndpointStatus.DEGRADED:
                    log.warning("endpoint %s is degraded: %s; its queued jobs wait", name, reason)
                self._endpoints.set_status(name, EndpointStatus.DEGRADED, reason)
            elif healthy and row.status == EndpointStatus.DEGRADED:
                log.info("endpoint %s is healthy again", name)
                self._endpoints.set_status(name, EndpointStatus.IN_SERVICE)


def _cloud_status(backend: Any) -> tuple[EndpointStatus, str | None] | None:
    """A backend's own status (``Backend.status``) as the row's, or None when it has none."""
    try:
        said = backend.status()
    except Exception as exc:  # noqa: BLE001 - a failing probe is itself the answer
        return EndpointStatus.FAILED, f"its status could not be read: {exc}"
    if said is None:
        return None
    status, reason = said
    try:
        return EndpointStatus(status), reason
    except ValueError:
        return EndpointStatus.FAILED, reason or f"unknown status {status!r}"


def _health(dispatcher: Dispatcher) -> tuple[bool, str]:
    try:
        healthy, reason = dispatcher.backend.health()
    except Exception as exc:  # noqa: BLE001 - a failing probe is itself the answer: unhealthy, saying why
        return False, f"its health check failed: {exc}"
    return bool(healthy), reason or ("" if healthy else "its backend reports that it cannot run jobs")
