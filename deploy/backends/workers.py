"""Thread workers shared by backends that run jobs in this process (local GPU workers, the fake).

Each worker owns one thread and runs one job at a time. A slot is taken when ``submit`` hands a job to
an idle worker and given back *before* the job's terminal event is emitted, so a dispatcher woken by
that event already sees the free slot. Cancellation (and A1111's skip) is a set of job ids the job's step
loop checks.

A device has one main worker. With ``share_training_device`` it also has a guest worker that runs one
generation job, and only while the main worker runs a job of another kind (a training, which leaves the
device's generation engine idle): a training then no longer makes generation wait for the whole run. The
device takes a new job on its main worker only when both are idle, so two trainings never share a device and
the device's engine is never driven by two threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from deploy.backends.base import STOPPED_MESSAGE, Backend, BackendBusy, BackendError, EventSink, deliver
from deploy.backends.messages import Cancelled, Event, Failed, JobSpec, Progress
from deploy.jobkinds import GENERATE

log = logging.getLogger(__name__)


class EtaClock:
    """Seconds left for a job from how long the done fraction took (passes and steps combined)."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def eta(self, fraction: float) -> float | None:
        if fraction <= 0:
            return None
        elapsed = time.monotonic() - self.started
        return max(0.0, elapsed / fraction * (1.0 - fraction))


def progress_event(job_id: str, step: int, total: int, job_no: int, job_count: int, clock: EtaClock,
                   preview_png: str | None = None, phase: str = "base") -> Progress:
    event = Progress(job_id=job_id, step=step, total=total, job_no=job_no, job_count=job_count,
                     preview_png=preview_png, phase=phase)
    return Progress(job_id=job_id, step=step, total=total, job_no=job_no, job_count=job_count,
                    eta=clock.eta(event.fraction), preview_png=preview_png, phase=phase)


class Worker(threading.Thread):
    """One job at a time from an inbox; ``run_job`` is the backend's."""

    def __init__(self, owner: ThreadedBackend, label: str, *, guest: bool = False) -> None:
        super().__init__(name=f"backend-{owner.name}-{label}{'-guest' if guest else ''}", daemon=True)
        self.owner = owner
        self.label = label
        """The device (slot) it runs on; a guest worker has its device's label, so it uses that device's engine."""
        self.guest = guest
        self.inbox: queue.Queue[JobSpec | None] = queue.Queue()
        self.busy = False
        self.current: str | None = None
        self.kind: str | None = None
        """The job kind it runs now (None when idle)."""

    def run(self) -> None:
        while True:
            spec = self.inbox.get()
            if spec is None:
                return
            terminal: Event | None = None
            try:
                if self.owner.is_cancelled(spec.job_id):  # stopping before it started: it may run elsewhere
                    terminal = (self.owner.stopped_event(spec.job_id) if self.owner.stopping
                                else Cancelled(job_id=spec.job_id, reason="cancelled before it started"))
                else:
                    terminal = self.owner.run_job(self, spec)
            except Exception as exc:  # noqa: BLE001 - the worker must survive and report any failure
                log.exception("worker %s: job %s crashed", self.name, spec.job_id)
                terminal = Failed(job_id=spec.job_id, message=f"internal error: {type(exc).__name__}: {exc}",
                                  kind="internal")
            finally:
                with self.owner.lock:
                    self.owner.forget(spec.job_id)
                    self.current = None
                    self.kind = None
                    self.busy = False
            if terminal is not None:
                self.owner.emit(terminal)


class ThreadedBackend(Backend, ABC):
    """A backend made of in-process worker threads; subclasses say what a worker runs."""

    def __init__(self, name: str, *, share_training_device: bool = False) -> None:
        super().__init__(name)
        self.share_training_device = share_training_device
        self.lock = threading.Lock()
        self.workers: list[Worker] = []
        """Every worker, guests included (cancel, skip and stop reach them all)."""
        self._devices: list[tuple[Worker, Worker | None]] = []  # (main, guest) per device
        self._kinds: tuple[str, ...] = ()
        self._sink: EventSink | None = None
        self._cancelled: set[str] = set()
        self._skips: set[str] = set()
        self._stopping = False

    @abstractmethod
    def worker_labels(self) -> list[str]:
        """One label (device / slot name) per worker to start."""

    @abstractmethod
    def run_job(self, worker: Worker, spec: JobSpec) -> Event:
        """Run ``spec`` on ``worker``'s thread, emitting progress; return the terminal event."""

    # -- contract ------------------------------------------------------------------------------------
    def start(self, sink: EventSink) -> None:
        if self._sink is not None:
            raise BackendError(f"backend {self.name!r} is already started")
        labels = self.worker_labels()
        self._kinds = self.capabilities().kinds
        share = self.share_training_device and GENERATE in self._kinds
        self._devices = [(Worker(self, label), Worker(self, label, guest=True) if share else None)
                         for label in labels]
        self.workers = [w for pair in self._devices for w in pair if w is not None]
        self._sink = sink
        for worker in self.workers:
            worker.start()

    def free_slots(self) -> int:
        with self.lock:
            return len(self._openings())

    def claimable_kinds(self) -> tuple[str, ...]:
        with self.lock:
            openings = self._openings()
        return tuple(k for k in self._kinds if any(k in kinds for _, kinds in openings))

    def submit(self, spec: JobSpec) -> None:
        if self._sink is None or self._stopping:
            raise BackendError(f"backend {self.name!r} is not running")
        with self.lock:
            worker = next((w for w, kinds in self._openings() if spec.kind in kinds), None)
            if worker is None:
                raise BackendBusy(f"backend {self.name!r} has no free worker for a {spec.kind} job")
            worker.busy = True
            worker.current = spec.job_id
            worker.kind = spec.kind
        worker.inbox.put(spec)

    def _openings(self) -> list[tuple[Worker, tuple[str, ...]]]:
        """The workers that take a job now, each with the kinds it takes (called with ``lock`` held): idle devices'
        main workers first (a job gets a device of its own when there is one), then guests beside a training."""
        if self._sink is None or self._stopping:
            return []
        free = [(main, self._kinds) for main, guest in self._devices
                if not main.busy and (guest is None or not guest.busy)]
        guests = [(guest, (GENERATE,)) for main, guest in self._devices
                  if guest is not None and not guest.busy and main.busy and main.kind != GENERATE]
        return free + guests

    def cancel(self, job_id: str) -> bool:
        return self._flag(job_id, self._cancelled)

    def skip(self, job_id: str) -> bool:
        return self._flag(job_id, self._skips)

    def _flag(self, job_id: str, flags: set[str]) -> bool:
        """Mark a job a worker holds (for its step loop to see); False when no worker holds it."""
        with self.lock:
            held = any(w.current == job_id for w in self.workers)
            if held:
                flags.add(job_id)
        return held

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        with self.lock:
            for worker in self.workers:
                if worker.current:
                    self._cancelled.add(worker.current)
        for worker in self.workers:
            worker.inbox.put(None)
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.warning("worker %s did not stop within %.0fs", worker.name, timeout)

    # -- for workers -----------------------------------------------------------------------------------
    def is_cancelled(self, job_id: str) -> bool:
        return job_id in self._cancelled

    def cancel_check(self, job_id: str) -> Callable[[], bool]:
        return lambda: job_id in self._cancelled

    def skip_check(self, job_id: str) -> Callable[[], bool]:
        """True once per ``skip`` call: answering consumes the request (the next batch runs normally)."""

        def check() -> bool:
            with self.lock:
                asked = job_id in self._skips
                self._skips.discard(job_id)
            return asked

        return check

    def forget(self, job_id: str) -> None:
        """Drop the job's cancel and skip flags (called with ``lock`` held when the job is over)."""
        self._cancelled.discard(job_id)
        self._skips.discard(job_id)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def emit(self, event: Event) -> None:
        deliver(self._sink, event, self.name)

    def stopped_event(self, job_id: str) -> Failed:
        """What a job cut short by ``stop`` reports: the queue may run it again."""
        return Failed(job_id=job_id, message=STOPPED_MESSAGE, kind="interrupted")
