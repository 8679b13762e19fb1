"""What backend tests share: a recording sink with bounded waits (job specs: ``tests.container.worker.fake_spec``)."""

from __future__ import annotations

import threading
import time
from typing import Any

from deploy.backends.messages import (
    Cancelled,
    Event,
    Failed,
    Progress,
    Succeeded,
)

TERMINAL = (Succeeded, Failed, Cancelled)


class Sink:
    """Records every event; ``wait_terminal`` / ``wait_progress`` wait (bounded) for what a test needs."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def of(self, cls: type | tuple[type, ...], job_id: str | None = None) -> list[Any]:
        with self._changed:
            return [e for e in self.events if isinstance(e, cls) and (job_id is None or e.job_id == job_id)]

    def for_job(self, job_id: str) -> list[Event]:
        with self._changed:
            return [e for e in self.events if e.job_id == job_id]

    def _wait(self, cls: type | tuple[type, ...], job_id: str, timeout: float, nth: int = 0) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [e for e in self.events if isinstance(e, cls) and e.job_id == job_id]
                if len(found) > nth:
                    return found[nth]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {cls} for job {job_id} within {timeout}s; got {self.events}")
                self._changed.wait(left)

    def wait_terminal(self, job_id: str, timeout: float = 30.0, nth: int = 0) -> Event:
        """The job's ``nth`` terminal event (1: the second run's, when the same job was sent again)."""
        return self._wait(TERMINAL, job_id, timeout, nth)

    def wait_progress(self, job_id: str, timeout: float = 30.0) -> Progress:
        return self._wait(Progress, job_id, timeout)
