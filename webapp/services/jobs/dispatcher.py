"""One dispatcher per endpoint: claims jobs while its backend has room, records what comes back.

Two threads: the claim loop (woken when a job is submitted or a slot frees, and every couple of
seconds anyway) and the event loop, which turns backend events into database rows and asset-store
blobs — progress on the in-memory board (and in the row now and then), images under
``jobs/<job_id>/<n>.png``, failures with their message. An out-of-memory failure fails that job with
the engine's message and the loop simply claims the next one. Backends are only ever handed plain
``JobSpec`` messages and only ever answer with events, so a remote backend fits unchanged.

Other studio instances may share the database (``queue.py``): every third of a lease the claim loop renews the
leases of the jobs in flight here in one UPDATE, which also says which of them someone asked to cancel (through
any instance: the backend is told here, where the job runs) and which this instance lost (it stalled past its
lease and another instance's reaper took the job: the backend drops it and its events are ignored).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from queue import Queue

from deploy.backends.base import Backend, BackendError
from deploy.backends.messages import (
    Cancelled,
    Event,
    Failed,
    JobModels,
    JobSpec,
    Progress,
    Started,
    Succeeded,
)
from deploy.jobkinds import GENERATE
from deploy.storage import BlobStore, StorageError
from pipelines.controlnet.units import ControlUnit, parse_indexed_units
from pipelines.types import GenerationRequest, InvalidRequestError
from webapp.records import Job, JobMode, JobStatus
from webapp.services.errors import ServiceError
from webapp.services.jobs.board import JobBoard, LiveProgress
from webapp.services.jobs.inputs import JobInputs, MissingInput
from webapp.services.jobs.queue import JobQueue
from webapp.services.jobs.reports import JobReport
from webapp.services.jobs.requests import engine_request

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
"""Claim-loop fallback poll: picks up jobs another process queued (no wake-up reaches us from there)."""
PROGRESS_WRITE_SECONDS = 1.0
"""How often a running job's progress is written to its row (the board always has the live value)."""


WAITING_PHASE = "waiting"
"""A ``Progress.phase`` saying the job has started but waits (its last log line says why and for how long)."""


def image_key(job_id: str, index: int) -> str:
    return f"jobs/{job_id}/{index}.png"


class Dispatcher:
    def __init__(self, *, endpoint: str, backend: Backend, queue: JobQueue, store: BlobStore, board: JobBoard) -> None:
        self.endpoint = endpoint
        self.backend = backend
        self.queue = queue
        self.store = store
        self.board = board
        self.inputs = JobInputs(store)
        self._wake = threading.Event()
        self._events: Queue[Event | None] = Queue()
        self._lock = threading.Lock()
        self._in_flight: dict[str, str] = {}  # job id -> worker label ("" until Started)
        self._cancel_pending: set[str] = set()
        self._last_write: dict[str, float] = {}
        self._reports: dict[str, JobReport] = {}
        self._detached: set[str] = set()  # running jobs whose backend gave a handle (they run elsewhere)
        self._lost: set[str] = set()  # jobs whose lease another instance took: their events are dropped
        self._renew_every = queue.lease_seconds / 3
        self._next_renewal = 0.0
        self._stopping = False
        self._held = False
        self._claimer: threading.Thread | None = None
        self._recorder: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.backend.start(self._receive)
        self.adopt_detached()
        self._recorder = threading.Thread(target=self._record_loop, name=f"jobs-{self.endpoint}-events", daemon=True)
        self._claimer = threading.Thread(target=self._claim_loop, name=f"jobs-{self.endpoint}-claims", daemon=True)
        self._recorder.start()
        self._claimer.start()

    def stop(self, timeout: float = 10.0, *, keep_detached: bool = False) -> None:
        """Stop claiming, stop the backend (running jobs report ``interrupted``), record what it said, and
        put anything still unaccounted for back in the queue without charging it an attempt.

        ``keep_detached`` (the server is stopping): jobs that run elsewhere with a recorded handle stay
        ``running`` for the next start to adopt; otherwise (the endpoint is going away) they are requeued too."""
        self._stopping = True
        self._wake.set()
        if self._claimer is not None:
            self._claimer.join(timeout)
        self.backend.stop(timeout)
        self._events.put(None)
        if self._recorder is not None:
            self._recorder.join(timeout)
        with self._lock:
            leftovers = [job_id for job_id in self._in_flight if not (keep_detached and job_id in self._detached)]
            kept = len(self._in_flight) - len(leftovers)
            self._in_flight.clear()
            self._detached.clear()
        if kept:
            log.info("dispatcher %s: %d job(s) go on running elsewhere; the next start takes them over",
                     self.endpoint, kept)
        for job_id in leftovers:
            self.queue.requeue(job_id, refund_attempt=True, reason="the server stopped while it ran")
            self.board.finish(job_id)

    def wake(self) -> None:
        self._wake.set()

    def hold(self) -> None:
        """Claim nothing new (the backend is unhealthy): queued jobs wait, running ones go on."""
        self._held = True

    def resume(self) -> None:
        self._held = False
        self._wake.set()

    @property
    def adopts(self) -> bool:
        """Its backend takes over, at start, jobs an earlier run left running elsewhere."""
        return bool(getattr(self.backend, "adopts", False))

    @property
    def held(self) -> bool:
        return self._held

    def _receive(self, event: Event) -> None:
        """The backend's sink (its threads): queue the event for recording. A terminal event means a
        slot is free now, so the claim loop starts the next job while this one's images are stored.
        A ``Started`` with a handle is recorded at once, on the backend's thread: before its ``submit``
        returns, the row knows how to find the job again."""
        if isinstance(event, Started) and event.handle is not None:
            with self._lock:
                self._detached.add(event.job_id)
            try:
                self.queue.set_handle(event.job_id, event.handle)
            except Exception:  # noqa: BLE001 - the job still runs; only a restart would lose track of it
                log.exception("dispatcher %s: recording the handle of job %s failed", self.endpoint, event.job_id)
        self._events.put(event)
        if isinstance(event, Succeeded | Failed | Cancelled):
            self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Ask the backend to stop ``job_id``; remembered in case the job is between claim and submit. Also
        called for a job whose cancel another instance recorded, when the lease renewal finds the flag."""
        with self._lock:
            self._cancel_pending.add(job_id)
        return self.backend.cancel(job_id)

    def skip(self, job_id: str) -> bool:
        """A1111's skip: the backend drops the job's current batch; False when it cannot."""
        return self.backend.skip(job_id)

    def in_flight(self) -> list[str]:
        with self._lock:
            return list(self._in_flight)

    def adopt_detached(self) -> None:
        """Hand the backend the jobs running elsewhere whose lease this instance took over (at start: restart
        recovery; later: the reaper, from an instance that died); one it cannot take over is run again."""
        for job in self.queue.detached(self.endpoint):
            with self._lock:  # the start and the reaper's thread may both hand it over: it is adopted once
                if job.id in self._in_flight:
                    continue
                self._in_flight[job.id] = job.worker or ""
                self._detached.add(job.id)
            handle = job.remote_handle or {}
            try:
                spec = self._spec(job)
            except Exception as exc:  # noqa: BLE001 - the stored job cannot be rebuilt: run it again
                log.warning("dispatcher %s: job %s cannot be rebuilt for adoption (%s)", self.endpoint, job.id, exc)
                spec = None
            with self._lock:
                self._reports[job.id] = JobReport(metrics=job.metrics, log_lines=job.log_lines,
                                                  artifact_keys=job.artifact_keys)
            self.board.post(job.id, LiveProgress(updated=time.monotonic()))
            try:
                adopted = spec is not None and self.backend.adopt(spec, handle)
            except Exception:  # noqa: BLE001 - as if it could not
                log.exception("dispatcher %s: adopting job %s failed", self.endpoint, job.id)
                adopted = False
            if adopted:
                log.info("dispatcher %s: took over job %s, still running elsewhere", self.endpoint, job.id)
                continue
            with self._lock:
                self._in_flight.pop(job.id, None)
                self._detached.discard(job.id)
                self._reports.pop(job.id, None)
            self.queue.requeue(job.id, refund_attempt=False, reason="its backend could not take it over after a restart")
            self.board.finish(job.id)

    # -- claiming -------------------------------------------------------------------------------------------
    def _claim_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                if time.monotonic() >= self._next_renewal:
                    self._renew()
                while not self._stopping and not self._held:
                    kinds = self.backend.claimable_kinds()
                    job = self.queue.claim(self.endpoint, kinds=kinds) if kinds else None
                    if job is None:
                        break
                    self._dispatch(job)
            except Exception:  # noqa: BLE001 - a database hiccup must not end the loop
                log.exception("dispatcher %s: claiming failed; retrying", self.endpoint)
                time.sleep(1.0)
            self._wake.wait(max(0.0, min(POLL_SECONDS, self._next_renewal - time.monotonic())))

    def _renew(self) -> None:
        """Renew the leases of the jobs in flight here; tell the backend of cancels requested elsewhere, and let
        go of the jobs this instance no longer holds."""
        self._next_renewal = time.monotonic() + self._renew_every
        with self._lock:
            ids = list(self._in_flight)
        renewal = self.queue.renew(ids)
        for job_id in sorted(renewal.cancel):
            with self._lock:
                known = job_id in self._cancel_pending
            if not known:
                log.info("dispatcher %s: job %s was cancelled (maybe through another instance)", self.endpoint, job_id)
                self.cancel(job_id)
        for job_id in set(ids) - renewal.held:
            with self._lock:  # gone from in-flight meanwhile: it finished here (the row is no longer running)
                lost = self._in_flight.pop(job_id, None) is not None
                if lost:
                    self._lost.add(job_id)
                    self._cancel_pending.discard(job_id)
                    self._detached.discard(job_id)
                    self._reports.pop(job_id, None)
            if lost:
                log.warning("dispatcher %s: job %s is no longer held by this instance (deleted, or its lease ran "
                            "out and another instance took it); dropping it here", self.endpoint, job_id)
                self.backend.cancel(job_id)
                self._last_write.pop(job_id, None)
                self.board.finish(job_id)

    def _engine_request(self, job: Job) -> tuple[GenerationRequest, tuple[ControlUnit, ...]]:
        """The request and units the job was validated with at submit, its input images read from the store.
        A row written before inputs moved to the store holds the request as sent: parsed here, once."""
        if job.engine_request_json:
            return self.inputs.load(job)
        raw = job.request
        units, _ = parse_indexed_units(raw.get("alwayson_scripts") or {})
        return engine_request(JobMode(job.mode), raw), tuple(unit for _, unit in units)

    def _spec(self, job: Job) -> JobSpec:
        models = JobModels.from_dict(job.models)
        if job.kind != GENERATE:  # the kind's payload, validated by its service at submit and by its runner
            return JobSpec(job_id=job.id, mode=str(job.mode), request=None, models=models, attempt=job.attempts,
                           kind=job.kind, payload=job.request)
        request, units = self._engine_request(job)
        return JobSpec(job_id=job.id, mode=str(job.mode), request=request, models=models, attempt=job.attempts,
                       controlnet_units=units)

    def _dispatch(self, job: Job) -> None:
        try:
            spec = self._spec(job)
        except StorageError as exc:  # the store is unreachable: try again later, as when a backend refuses
            log.warning("dispatcher %s: reading the inputs of job %s failed (%s); requeued", self.endpoint, job.id, exc)
            self.queue.requeue(job.id, refund_attempt=True, reason=str(exc))
            self.board.finish(job.id)
            time.sleep(0.5)
            return
        except (ServiceError, KeyError, ValueError, InvalidRequestError, MissingInput) as exc:
            message = exc.message if isinstance(exc, ServiceError) else f"the stored job cannot be run: {exc}"
            kind = "internal" if isinstance(exc, MissingInput) else "bad_request"
            self.queue.finish(job.id, JobStatus.FAILED, error=message, error_kind=kind)
            self.board.finish(job.id)
            return
        with self._lock:
            self._in_flight[job.id] = ""
            self._lost.discard(job.id)
            self._reports[job.id] = JobReport(metrics=job.metrics, log_lines=job.log_lines,
                                              artifact_keys=job.artifact_keys)
        self.board.post(job.id, LiveProgress(updated=time.monotonic()))
        try:
            self.backend.submit(spec)
        except BackendError as exc:
            log.warning("dispatcher %s: backend refused job %s (%s); requeued", self.endpoint, job.id, exc)
            with self._lock:
                self._in_flight.pop(job.id, None)
                self._reports.pop(job.id, None)
            self.queue.requeue(job.id, refund_attempt=True, reason=str(exc))
            self.board.finish(job.id)
            time.sleep(0.5)
            return
        with self._lock:
            cancel = job.id in self._cancel_pending or job.cancel_requested
        if cancel:
            self.backend.cancel(job.id)

    # -- recording --------------------------------------------------------------------------------------------
    def _record_loop(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            try:
                self._record(event)
            except Exception:  # noqa: BLE001 - keep recording the other jobs
                log.exception("dispatcher %s: recording %s for job %s failed", self.endpoint,
                              type(event).__name__, getattr(event, "job_id", "?"))

    def _record(self, event: Event) -> None:
        job_id = event.job_id
        with self._lock:
            lost = job_id in self._lost
            if lost and isinstance(event, Succeeded | Failed | Cancelled):
                self._lost.discard(job_id)
        if lost:  # another instance holds it now: nothing of this run is recorded or stored
            return
        if isinstance(event, Progress):
            self._progress(event)
        elif isinstance(event, Started):
            with self._lock:
                known = job_id in self._in_flight
                if known:
                    self._in_flight[job_id] = event.worker
            if known and event.worker:
                self.queue.set_worker(job_id, event.worker)  # History shows where a running job runs
        elif isinstance(event, Succeeded):
            self._with_images(event, JobStatus.SUCCEEDED, progress=1.0)
        elif isinstance(event, Failed):
            self._failed(event)
        elif isinstance(event, Cancelled):
            # Batches finished before the cancel are kept, as A1111's interrupt keeps them.
            self._with_images(event, JobStatus.CANCELLED, error=event.reason, error_kind="cancelled")

    def _progress(self, event: Progress) -> None:
        now = time.monotonic()
        with self._lock:
            report = self._reports.get(event.job_id)
        if report is not None:
            report.add(step=event.step, metrics=event.metrics, log=event.log,
                       artifact_keys=self._own_keys(event.job_id, event.artifact_keys))
        self.board.post(event.job_id, LiveProgress(
            step=event.step, total=event.total, job_no=event.job_no, job_count=event.job_count, eta=event.eta,
            preview_png=event.preview, phase=event.phase, updated=now, metrics=dict(event.metrics) or None,
            note=event.log[-1] if event.phase == WAITING_PHASE and event.log else None))
        if now - self._last_write.get(event.job_id, 0.0) >= PROGRESS_WRITE_SECONDS:
            self._last_write[event.job_id] = now
            values: dict[str, object] = {
                "progress": event.fraction, "step": event.step, "steps": event.total, "job_no": event.job_no,
                "job_count": event.job_count, "eta_seconds": event.eta}
            if report is not None and report.changed:
                values.update(report.columns())
                report.changed = False
            self.queue.record_progress(event.job_id, values)

    def _final_report(self, job_id: str, artifact_keys: tuple[str, ...]) -> JobReport:
        """The job's report at the end: what its row held when claimed, what progress events said, and the terminal
        event's artifacts."""
        with self._lock:
            report = self._reports.get(job_id)
        if report is None:
            report = JobReport()
        report.add(step=0, metrics={}, log=(), artifact_keys=artifact_keys)
        return report

    def _report_columns(self, job_id: str, artifact_keys: tuple[str, ...]) -> dict[str, object]:
        return self._final_report(job_id, artifact_keys).columns()

    def _own_keys(self, job_id: str, keys: tuple[str, ...]) -> tuple[str, ...]:
        """The keys a worker reported that lie under the job's own ``jobs/<job_id>/``: a remote worker (a box or a
        SageMaker container we do not control) must not make a job show, count or — when it is deleted — delete
        another job's files."""
        prefix = f"jobs/{job_id}/"
        own = tuple(key for key in keys if isinstance(key, str) and key.startswith(prefix) and ".." not in key)
        if len(own) != len(keys):
            log.warning("dispatcher %s: job %s reported %d file(s) outside %s; ignored", self.endpoint, job_id,
                        len(keys) - len(own), prefix)
        return own

    def _with_images(self, event: Succeeded | Cancelled, status: JobStatus, **values: object) -> None:
        keys = list(self._own_keys(event.job_id, event.image_keys))
        artifact_keys = self._own_keys(event.job_id, event.artifact_keys)
        if event.images:
            keys = []
            try:
                for index, png in enumerate(event.images):
                    key = image_key(event.job_id, index)
                    self.store.put(key, io.BytesIO(png), content_type="image/png")
                    keys.append(key)
            except Exception as exc:  # noqa: BLE001 - the store failed: the job fails, nothing half-stored stays
                log.exception("job %s: storing its images failed", event.job_id)
                self._delete_keys(keys)
                self._finish(event.job_id, JobStatus.FAILED, error=f"storing the images failed: {exc}",
                             error_kind="internal")
                return
            result_bytes = sum(len(png) for png in event.images)
        else:
            result_bytes = self._stored_size(event.job_id, keys)
        # every artifact of the job counts once, here: those of earlier attempts and those it started with (a
        # resumed training's earlier epochs) were never counted, as a job's bytes are added only when it ends
        report = self._final_report(event.job_id, artifact_keys)
        result_bytes += self._stored_size(event.job_id, report.artifacts)
        recorded = self._finish(
            event.job_id, status, image_keys_json=keys, infotexts_json=list(event.infotexts),
            info_json=dict(event.info), warnings_json=list(event.warnings), timings_json=dict(event.timings),
            result_bytes=result_bytes, **report.columns(), **values)
        if not recorded:  # deleted or cancelled meanwhile: keep no orphan images or artifacts
            self._delete_keys(keys + list(artifact_keys))

    def _failed(self, event: Failed) -> None:
        if event.kind == "interrupted":
            columns = self._report_columns(event.job_id, ())
            if columns:  # what a requeued job reported so far stays on its row (a resumed training continues it)
                self.queue.record_progress(event.job_id, columns)
            with self._lock:
                self._in_flight.pop(event.job_id, None)
                self._cancel_pending.discard(event.job_id)
                self._detached.discard(event.job_id)
            self.queue.requeue(event.job_id, refund_attempt=self._stopping, reason=event.message)
            self._done(event.job_id)
            return
        message = event.message
        if event.kind == "oom":
            message = f"out of memory: {message}" if "memory" not in message.lower() else message
        self._finish(event.job_id, JobStatus.FAILED, error=message, error_kind=event.kind,
                     **self._report_columns(event.job_id, ()))

    def _finish(self, job_id: str, status: JobStatus, **values: object) -> bool:
        with self._lock:
            worker = self._in_flight.pop(job_id, None)
            self._cancel_pending.discard(job_id)
            self._detached.discard(job_id)
        if worker:
            values["worker"] = worker
        for key in [k for k in values if k.endswith("_json")]:
            if not isinstance(values[key], str):
                values[key] = json.dumps(values[key])
        recorded = self.queue.finish(job_id, status, **values)
        if recorded:
            log.info("job %s %s on %s", job_id, status, self.endpoint)
        self._done(job_id)
        return recorded

    def _done(self, job_id: str) -> None:
        self._last_write.pop(job_id, None)
        with self._lock:
            self._reports.pop(job_id, None)
        self.board.finish(job_id)
        self._wake.set()

    def _stored_size(self, job_id: str, keys: list[str]) -> int:
        """Bytes of images a worker stored itself (the disk quota counts them); 0 if the store cannot say."""
        try:
            return sum(blob.size for blob in map(self.store.stat, keys) if blob is not None)
        except StorageError:
            log.warning("job %s: the sizes of its images are unknown; the disk quota does not count them", job_id,
                        exc_info=True)
            return 0

    def _delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.store.delete(key)
            except Exception:  # noqa: BLE001 - best effort; logged
                log.exception("could not delete %s", key)
