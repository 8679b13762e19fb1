"""Progress of async SageMaker invocations, written as small JSON objects to the asset store.

An async invocation has no stream back to the control plane: SageMaker hands the container the request as
a plain ``POST /invocations`` and writes the answer to S3 only at the end. The control plane therefore asks
for progress in the request's custom attributes (``X-Amzn-SageMaker-Custom-Attributes: progress=<key>``)
and the worker writes the job's latest state to that store key — at most once per ``interval`` while it
runs, and once more at the end — for the control plane to poll and show (step, ETA, a preview).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from deploy.backends.messages import Cancelled, Event, Failed, Started, Succeeded
from deploy.container.host import JobBuffer
from deploy.container.references import reference
from deploy.storage import BlobStore, StorageError

log = logging.getLogger(__name__)

ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
PROGRESS_ATTRIBUTE = "progress"


def parse_custom_attributes(header: str | None) -> dict[str, str]:
    """``a=1,b=2`` (SageMaker passes the caller's string as is) as a dict; entries without ``=`` are ignored."""
    found: dict[str, str] = {}
    for part in (header or "").split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            found[name.strip()] = value.strip()
    return found


def progress_key(attributes: Mapping[str, str]) -> str | None:
    """The store key progress goes to, validated (``InvalidKey`` names what is wrong); None when not asked."""
    return reference(attributes, PROGRESS_ATTRIBUTE)


def _status(event: Event | None) -> str:
    if event is None:
        return "queued"
    return {Succeeded: "succeeded", Failed: "failed", Cancelled: "cancelled"}.get(type(event), "running")


class ProgressWriter:
    """Writes one job's progress object to ``key`` in ``store`` (throttled; failures are logged, not raised)."""

    def __init__(self, store: BlobStore, key: str, *, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.key = key
        self.interval = interval
        self._clock = clock
        self._last_write: float | None = None
        self._last_seq = -1
        self.writes = 0

    def __call__(self, buffer: JobBuffer) -> None:
        """``WorkerHost.run``'s ``on_event``: write when something changed and the interval passed (or it ended)."""
        if buffer.last_seq == self._last_seq:
            return  # nothing new
        now = self._clock()
        due = self._last_write is None or now - self._last_write >= self.interval
        if not (due or buffer.done):
            return
        self._last_seq = buffer.last_seq
        self._last_write = now
        self._write(snapshot(buffer))

    def _write(self, document: Mapping[str, Any]) -> None:
        data = json.dumps(document).encode("utf-8")
        try:
            self.store.put(self.key, io.BytesIO(data), content_type="application/json")
            self.writes += 1
        except (StorageError, OSError) as exc:
            log.warning("could not write progress to %s: %s", self.key, exc)


def snapshot(buffer: JobBuffer) -> dict[str, Any]:
    """What the control plane shows of a job: its state, the latest step and preview, the outcome's gist."""
    terminal = buffer.terminal
    progress = buffer.latest_progress()
    started = next((e for _, e in buffer.entries if isinstance(e, Started)), None)
    document: dict[str, Any] = {
        "job_id": buffer.job_id,
        "status": _status(terminal) if terminal is not None else ("running" if started or progress else "queued"),
        "worker": started.worker if started else None,
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "step": 0, "total": 0, "job_no": 0, "job_count": 1, "fraction": 0.0, "eta": None, "preview_png": None,
    }
    if progress is not None:
        document.update(step=progress.step, total=progress.total, job_no=progress.job_no,
                        job_count=progress.job_count, fraction=round(progress.fraction, 4), eta=progress.eta,
                        preview_png=progress.preview_png, phase=progress.phase)
    if isinstance(terminal, Failed):
        document.update(message=terminal.message, kind=terminal.kind, field=terminal.field)
    elif isinstance(terminal, Succeeded | Cancelled):
        document.update(images=terminal.count, fraction=1.0 if isinstance(terminal, Succeeded) else document["fraction"],
                        preview_png=None)
    return document
