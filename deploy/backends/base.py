"""The one contract every backend implements: local GPU workers now, HTTP workers and SageMaker next.

The control plane (webapp's dispatcher) only ever talks to this interface: it asks which kinds of job a
backend can take now (``claimable_kinds``; ``free_slots`` counts the slots), hands it ``JobSpec``s, asks it
to ``cancel`` one, and receives events (``Started``, ``Progress``, ``Succeeded``, ``Failed``, ``Cancelled``)
through the sink given to ``start``. Events are plain messages (deploy.backends.messages), never Python
objects tied to the worker, so a backend in another process or another cloud fits without changing the
services or the UI.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from deploy.backends.messages import Event, JobSpec
from deploy.jobkinds import GENERATE

log = logging.getLogger(__name__)

EventSink = Callable[[Event], None]
"""Receives every event of every job; called from the backend's own threads, must not block long."""


STOPPED_MESSAGE = "the backend stopped while the job was running"
"""What a job cut short by ``stop`` reports (with ``kind="interrupted"``): the queue may run it again."""


def deliver(sink: EventSink | None, event: Event, backend: str) -> None:
    """Hand ``event`` to ``sink`` from a backend's own thread: a broken sink is logged, never kills the thread."""
    if sink is None:
        return
    try:
        sink(event)
    except Exception:  # noqa: BLE001 - a broken sink must not kill the worker
        log.exception("backend %s: the event sink failed on %s", backend, type(event).__name__)


class BackendError(RuntimeError):
    """A backend could not do what was asked (not started, misconfigured, transport failure)."""


class BackendBusy(BackendError):
    """``submit`` was called with no free slot; the caller should have checked ``free_slots``."""


class BackendNotConfigured(BackendError):
    """The backend lacks configuration it needs (e.g. an endpoint URL); ``is_configured`` says False."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, shown on the Endpoints tab and used by the UI (remote → "Generate on Cloud")."""

    modes: tuple[str, ...] = ("txt2img", "img2img", "inpaint")
    slots: int = 1
    """How many jobs it runs at once (local: one per device)."""
    remote: bool = False
    """Jobs leave this server."""
    previews: bool = True
    devices: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ("checkpoint", "vae", "lora", "embedding", "hypernetwork")
    samplers: tuple[str, ...] = ()
    """Sampler names its engine runs (A1111's names); empty: unknown (the UI then offers every sampler)."""
    schedulers: tuple[str, ...] = ()
    """Schedule type labels (Automatic, Karras ...)."""
    upscalers: tuple[str, ...] = ()
    """Hires-fix upscalers."""
    kinds: tuple[str, ...] = (GENERATE,)
    """Job kinds it runs (``deploy.jobkinds``): a dispatcher claims only these, and a submit of another kind to
    this endpoint is refused."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"modes": list(self.modes), "slots": self.slots, "remote": self.remote, "previews": self.previews,
                "devices": list(self.devices), "model_types": list(self.model_types), "samplers": list(self.samplers),
                "schedulers": list(self.schedulers), "upscalers": list(self.upscalers), "kinds": list(self.kinds),
                "extra": dict(self.extra)}


def engine_lists() -> dict[str, tuple[str, ...]]:
    """The sampler, schedule and upscaler names of this code's engine (cheap: no torch import), for the
    ``Capabilities`` of backends that run ``pipelines`` — the UI shows an endpoint's own lists."""
    from pipelines.samplers import list_samplers, list_schedulers
    from pipelines.types import HR_UPSCALERS

    return {"samplers": tuple(s["name"] for s in list_samplers()),
            "schedulers": tuple(s["label"] for s in list_schedulers()), "upscalers": tuple(HR_UPSCALERS)}


class Backend(ABC):
    """A place jobs run. One instance per configured endpoint; created by the registry from config."""

    kind: ClassVar[str]
    adopts: ClassVar[bool] = False
    """True when ``adopt`` can take over jobs that left a ``Started.handle`` (restart recovery keeps them running)."""
    owns_cloud_resources: ClassVar[bool] = False
    """True when deleting the endpoint must also delete what it created elsewhere (``teardown``): jobs running
    there would be lost, so the delete is refused while any runs unless forced."""

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def is_configured(self) -> bool:
        """True when the backend has everything it needs to run jobs (no network calls: cheap)."""

    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What it can do; may become more precise after ``start`` (e.g. devices found)."""

    @abstractmethod
    def start(self, sink: EventSink) -> None:
        """Begin accepting jobs; every event goes to ``sink``. Must not import heavy libraries on the
        caller's thread (the app starts in seconds): workers do that when their first job arrives."""

    @abstractmethod
    def free_slots(self) -> int:
        """How many more jobs ``submit`` accepts right now (some maybe only of certain kinds: ``claimable_kinds``)."""

    def claimable_kinds(self) -> tuple[str, ...]:
        """The job kinds ``submit`` accepts right now (the dispatcher claims only these). Default: every kind it
        runs while a slot is free. A backend whose free capacity depends on the kind says so here: the local
        backend sharing a device with a training takes one more generation job there, never a second training."""
        return self.capabilities().kinds if self.free_slots() > 0 else ()

    @abstractmethod
    def submit(self, spec: JobSpec) -> None:
        """Start running ``spec`` (asynchronously); raises ``BackendBusy`` when no slot is free for its kind."""

    @abstractmethod
    def cancel(self, job_id: str) -> bool:
        """Ask the job to stop (a running job stops within one sampling step and reports ``Cancelled``).
        Returns False when this backend does not hold the job."""

    def release_memory(self) -> None:
        """Drop the models it holds loaded (A1111 unload-checkpoint); they load again at the next job that
        needs them. Running jobs keep what they use until they end. Default: nothing is held here."""
        return None

    def health(self) -> tuple[bool, str | None]:
        """``(True, None)`` when jobs can run now; ``(False, reason)`` when the backend is degraded (a remote
        worker unreachable or slow): its endpoint shows Degraded with the reason and its jobs wait.
        Asked every few seconds for every running endpoint from one thread: answer from what the backend last
        observed, never a blocking network call. An exception counts as unhealthy with its message."""
        return True, None

    def adopt(self, spec: JobSpec, handle: Mapping[str, Any]) -> bool:
        """Take over a job an earlier run of the control plane submitted and that went on running elsewhere
        (its ``Started.handle``); its events then follow as for a submitted job, whatever its slots say.
        False (the default): this backend cannot, and the job is run again."""
        return False

    def status(self) -> tuple[str, str | None] | None:
        """For a backend whose readiness is decided elsewhere (a cloud endpoint being created): the endpoint
        status to show (``Creating``, ``InService``, ``Failed``) and why; None (the default): decided here."""
        return None

    def teardown(self) -> None:
        """Delete what this endpoint created outside the studio (called once, after ``stop``, when an
        administrator deletes the endpoint). Default: nothing."""
        return None

    def skip(self, job_id: str) -> bool:
        """A1111's skip: drop the running job's current batch and go on with its next one (``n_iter``).
        Returns False when this backend does not hold the job or cannot skip (the default)."""
        return False

    @abstractmethod
    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting jobs, cancel running ones and release workers. Jobs cut short report
        ``Failed(kind="interrupted")`` so the queue can run them again later. A job with a ``Started.handle``
        is not cut short — it goes on elsewhere — and reports nothing: the next start adopts it."""

    def describe(self) -> str:
        """A one-line, human status for the Endpoints tab."""
        caps = self.capabilities()
        return f"{self.kind}: {caps.slots} slot(s){' on ' + ', '.join(caps.devices) if caps.devices else ''}"
