"""The endpoints running in this process: a backend and a dispatcher per endpoint row, while the server runs.

``JobService`` only queues and follows jobs; the fleet decides which endpoints have a running dispatcher.
It builds each backend through the registry from its row (kind + options), attaches a ``Dispatcher`` to the
service and detaches it again, so administrators can add and remove endpoints without a restart. A backend
that cannot be built leaves its endpoint ``Failed`` with the reason instead of stopping the server: the UI
and the queue stay up and say why jobs cannot run there.

A daemon thread asks every running backend ``health()`` every few seconds: an unhealthy one turns its
endpoint ``Degraded`` with the reason and its dispatcher claims nothing new (queued jobs wait, new submits
are still accepted), and it is ``InService`` again once healthy.

Several studio instances may share the database: an administrator's deploy, delete or Stopped reaches this
instance through the same poll (``sync``), which compares the dispatchers running here with the rows. A row
in service (InService, Degraded, Stopped) with no dispatcher here is built from the row (never provisioning:
only the deploying instance creates cloud resources; a row still Creating is left to it); a dispatcher whose
row is gone or Deleting is stopped and its jobs go back to the queue (then to the default endpoint, as the
deleting instance does with its own); one whose row now holds another configuration is rebuilt; a Stopped row
holds its dispatcher (it claims nothing). A row this instance cannot build is logged and not retried until the
row changes: the row keeps what its deployer wrote, and the other instances run its jobs.

Status writes on a shared row: each instance writes only what its own view changes. A cloud backend's status
is the cloud's (every instance watches the same endpoint), except that a poll never moves a row back to
Creating (a just-built watcher has not had its first answer yet). Degraded is per instance: an instance
records it over InService, and only the instance that recorded it clears it, so two instances that disagree do
not flip the row; an instance that stops while its Degraded stands leaves it until some instance's restart
re-checks the endpoint (Degraded endpoints still take jobs, and healthy instances still claim them).
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
JOINABLE = (EndpointStatus.IN_SERVICE, EndpointStatus.DEGRADED, EndpointStatus.STOPPED)
"""Row states whose endpoint an instance that did not deploy it builds at its next poll: its deployer built it
(Creating is the deployer's to finish, Failed a build that did not work; a restart re-checks both)."""


class RowConfigError(ValueError):
    """A stored endpoint row cannot be turned back into options (bad JSON, secrets that do not open)."""


def _fingerprint(row: Endpoint) -> tuple[Any, ...]:
    """What a backend is built from: a row whose fingerprint changed (options, secrets, bounds, or a new row
    under the same name) needs a new backend; a status change does not (``updated_at`` moves with both)."""
    return (row.kind, row.config_json, row.secrets_token, row.min_instances, row.max_instances, row.autoscale,
            row.created_at)


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
        # start/stop by an administrator and the poll's sync change the same dispatchers: one at a time
        self._lock = threading.RLock()
        self._built: dict[str, tuple[Any, ...]] = {}  # endpoint -> fingerprint of the row its backend came from
        self._failed: dict[str, tuple[Any, ...]] = {}  # endpoint -> fingerprint of a row that failed to build here
        self._leaving: set[str] = set()  # stopped here while Deleting: their queued jobs move once the row goes
        self._degraded_here: set[str] = set()  # endpoints whose Degraded this instance recorded

    # -- building ---------------------------------------------------------------------------------------------
    def _config(self, name: str, kind: str, options: Mapping[str, Any], bounds: tuple[int, int, bool], *,
                provision: bool = False) -> BackendConfig:
        low, high, autoscale = bounds
        return BackendConfig(name=name, kind=kind, options={**self._kind_defaults.get(kind, {}), **options},
                             model_files=self._model_files, store=self._store, min_instances=low,
                             max_instances=high, autoscale=autoscale, provision=provision)

    def _dispatcher(self, name: str, backend: Any) -> Dispatcher:
        return Dispatcher(endpoint=name, backend=backend, queue=self._queue, store=self._store, board=self._board)

    def _row_options(self, row: Endpoint) -> dict[str, Any]:
        """The options ``row`` was deployed with, secrets decrypted; ``RowConfigError`` saying why not."""
        try:
            options = json.loads(row.config_json or "{}")
        except ValueError:
            options = None
        if not isinstance(options, dict):
            raise RowConfigError("its stored configuration is not a JSON object")
        try:
            options.update(self._secrets.open(row.secrets_token) if row.secrets_token else {})
        except SecretsError as exc:
            raise RowConfigError(str(exc)) from None
        return options

    def _remember(self, name: str, *, built: bool) -> None:
        """Record the row ``name``'s backend was (or failed to be) built from, for the poll's comparison."""
        row = self._endpoints.find(name)  # just written here: the cache was invalidated
        if row is None:
            return
        (self._built if built else self._failed)[name] = _fingerprint(row)
        (self._failed if built else self._built).pop(name, None)

    def start_endpoint(self, name: str, kind: str, options: Mapping[str, Any], *, is_default: bool = False,
                       keep: EndpointStatus | None = None, bounds: tuple[int, int, bool] = (1, 1, False),
                       provision: bool = False) -> EndpointStatus:
        """Build ``name``'s backend from ``options`` (secrets included) and attach its dispatcher; the row says
        ``InService`` (or ``keep``, or what a cloud backend's ``status()`` says: ``Creating``) or ``Failed`` with
        the reason. The row records the options without their secret fields (those live only in its encrypted
        column). ``bounds``: the row's (min, max, autoscale); ``provision``: an administrator deploys it now (a cloud
        backend creates its resources; a restart only watches them)."""
        with self._lock:
            status = self._start(name, kind, options, is_default=is_default, keep=keep, bounds=bounds,
                                 provision=provision)
            self._remember(name, built=name in self._service.dispatchers())
            return status

    def _start(self, name: str, kind: str, options: Mapping[str, Any], *, is_default: bool,
               keep: EndpointStatus | None, bounds: tuple[int, int, bool], provision: bool) -> EndpointStatus:
        hidden = secret_fields(kind)
        recorded = {key: value for key, value in options.items() if key not in hidden}
        config = self._config(name, kind, options, bounds, provision=provision)

        def failed(exc: Exception) -> EndpointStatus:
            self._endpoints.ensure(name=name, kind=kind, remote=False, capabilities={}, config=recorded,
                                   is_default=is_default, status=EndpointStatus.FAILED, error=str(exc))
            return EndpointStatus.FAILED

        try:
            backend = create_backend(config)
            caps, configured = backend.capabilities(), backend.is_configured()
            if configured:  # running before the row says so: a submit never finds it InService but not running
                self._service.attach(self._dispatcher(name, backend))
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
        with self._lock:
            self._built.pop(name, None)
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
        try:
            backend = create_backend(self._config(name, row.kind, options, _bounds(row)))
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
                options = self._row_options(row)
            except RowConfigError as exc:
                log.error("the %s endpoint cannot run jobs: %s", row.name, exc)
                self._endpoints.set_status(row.name, EndpointStatus.FAILED, str(exc))
                self._remember(row.name, built=False)
                continue
            # An administrator's Stopped survives a restart; anything else is re-checked now.
            keep = EndpointStatus.STOPPED if row.status == EndpointStatus.STOPPED else None
            self.start_endpoint(row.name, row.kind, options, is_default=row.is_default, keep=keep,
                                bounds=_bounds(row))

    # -- other instances' changes -----------------------------------------------------------------------------
    def sync(self) -> dict[str, Endpoint]:
        """Bring the dispatchers running here in line with the rows (read now, not from the cache): build the
        endpoints other instances deployed, stop those deleted, rebuild those whose configuration changed (see
        the module's docstring). Returns the rows read, by name."""
        with self._lock:
            rows = {row.name: row for row in self._endpoints.stored(fresh=True)}
            for name in self._service.dispatchers():
                if name == LOCAL_ENDPOINT:
                    continue  # every instance writes it from its own settings
                row = rows.get(name)
                if row is None or row.status == EndpointStatus.DELETING:
                    log.info("endpoint %s is being deleted (by another instance): its dispatcher here stops", name)
                    self._retire(name, keep_detached=False)
                    self._leaving.add(name)
                elif name in self._built and self._built[name] != _fingerprint(row):
                    log.info("endpoint %s was redeployed with another configuration: rebuilding it here", name)
                    self._retire(name, keep_detached=True)  # the new dispatcher adopts what runs elsewhere
            self._move_from_deleted(rows)
            running = self._service.dispatchers()
            for row in rows.values():
                if row.name == LOCAL_ENDPOINT or row.is_default or row.name in running or row.status not in JOINABLE:
                    continue
                if self._failed.get(row.name) != _fingerprint(row):
                    self._join(row)
            for memo in (self._built, self._failed):
                for name in [name for name in memo if name not in rows]:
                    del memo[name]
            return rows

    def _retire(self, name: str, *, keep_detached: bool) -> None:
        self._built.pop(name, None)
        dispatcher = self._service.detach(name)
        if dispatcher is not None:
            dispatcher.stop(keep_detached=keep_detached)

    def _move_from_deleted(self, rows: Mapping[str, Endpoint]) -> None:
        """Jobs this instance put back in the queue of an endpoint being deleted would wait for a row that is
        gone: once it is, they go to the default endpoint (as the deleting instance did with the rest)."""
        for name in list(self._leaving):
            row = rows.get(name)
            if row is not None and row.status == EndpointStatus.DELETING:
                continue  # the deleting instance is still at it
            self._leaving.discard(name)
            if row is not None:
                continue  # the delete failed: the row stays, and so do its jobs
            target = self._endpoints.default_name() or LOCAL_ENDPOINT
            moved = self._queue.move_queued(name, target)
            dispatcher = self._service.dispatchers().get(target)
            if moved and dispatcher is not None:
                dispatcher.wake()

    def _join(self, row: Endpoint) -> None:
        """Run ``row``'s endpoint here too (another instance deployed it): built from the row, never provisioning;
        the row is not written (its deployer's outcome stands; a failure here is logged and remembered)."""
        try:
            backend = create_backend(self._config(row.name, row.kind, self._row_options(row), _bounds(row)))
            if not backend.is_configured():
                raise BackendError(f"the {row.kind} backend is not configured")
            dispatcher = self._dispatcher(row.name, backend)
            if row.status == EndpointStatus.STOPPED:
                dispatcher.hold()  # before it starts: it claims nothing
            self._service.attach(dispatcher)
        except Exception as exc:  # noqa: BLE001 - logged; the other instances run its jobs meanwhile
            log.error("endpoint %s cannot run jobs on this instance (%s); not retried until its row changes",
                      row.name, exc)
            self._failed[row.name] = _fingerprint(row)
            return
        self._built[row.name] = _fingerprint(row)
        self._failed.pop(row.name, None)
        log.info("endpoint %s (%s) now runs here too", row.name, row.kind)

    # -- health -------------------------------------------------------------------------------------------------
    def start(self, health_seconds: float) -> None:
        """Poll the rows and the running backends' health every ``health_seconds`` (0: never) until ``stop``."""
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
        """Sync with the rows, then ask every running backend once; hold or resume its dispatcher (a Stopped
        row holds it too) and record Degraded / InService or the cloud's status."""
        rows = self.sync()
        for name, dispatcher in self._service.dispatchers().items():
            healthy, reason = _health(dispatcher)
            row = rows.get(name)
            if healthy and not (row is not None and row.status == EndpointStatus.STOPPED):
                if dispatcher.held:
                    dispatcher.resume()
            else:
                dispatcher.hold()
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
                self._record_cloud(row, cloud)
            else:
                self._record_health(row, healthy, reason)

    def _record_cloud(self, row: Endpoint, cloud: tuple[EndpointStatus, str | None]) -> None:
        if row.status in (EndpointStatus.STOPPED, EndpointStatus.DELETING) or (row.status, row.error) == cloud:
            return
        if cloud[0] == EndpointStatus.CREATING and row.status != EndpointStatus.CREATING:
            return  # never back to Creating: a watcher built by a later start has not had its first answer yet
        if cloud[0] != row.status:
            log.info("endpoint %s is %s%s", row.name, cloud[0], f": {cloud[1]}" if cloud[1] else "")
        self._endpoints.set_status(row.name, *cloud)

    def _record_health(self, row: Endpoint, healthy: bool, reason: str) -> None:
        """Degraded is this instance's view: recorded over InService (or over its own Degraded, with a new
        reason), cleared only by the instance that recorded it."""
        name = row.name
        if row.status not in (EndpointStatus.IN_SERVICE, EndpointStatus.DEGRADED):
            self._degraded_here.discard(name)
            return  # Creating, Stopped by an administrator, Deleting, Failed: their own state wins
        mine = name in self._degraded_here and row.status == EndpointStatus.DEGRADED
        if not healthy:
            if row.status == EndpointStatus.IN_SERVICE or (mine and row.error != reason):
                if row.status != EndpointStatus.DEGRADED:
                    log.warning("endpoint %s is degraded: %s; its queued jobs wait", name, reason)
                self._endpoints.set_status(name, EndpointStatus.DEGRADED, reason)
                self._degraded_here.add(name)
        else:
            if mine:
                log.info("endpoint %s is healthy again", name)
                self._endpoints.set_status(name, EndpointStatus.IN_SERVICE)
            self._degraded_here.discard(name)


def _bounds(row: Endpoint) -> tuple[int, int, bool]:
    return row.min_instances, row.max_instances, row.autoscale


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
