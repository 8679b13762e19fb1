"""Who this studio process is, for the job leases several instances on one database share.

Every process that dispatches jobs is an *instance* with an id of its own, new at each start. A job it claims
carries that id (``Job.lease_owner``) and an expiry (``Job.lease_expires_at``) that its dispatcher keeps pushing
forward while the job runs; a running job whose lease has run out belongs to an instance that died, and any
instance's reaper puts it back in the queue. "Running when I start" therefore no longer means "dead": another
live instance may be running it.

One case is still known at once instead of after a lease: a restart of the same installation. The id starts with
the data dir's *home* (a random name kept in ``<data-dir>/instance.lock``), and the process holds an exclusive
``flock`` on that file for as long as it runs (the kernel drops it when the process dies, ``kill -9`` included).
Whoever gets the lock knows that every lease of its home belongs to a predecessor that is gone, and takes those
jobs back at start without waiting for their leases to run out. A second process on the same data dir (not
a supported set-up, but not a dangerous one) does not get the lock and uses a home of its own.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: every start waits for the leases of a predecessor
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

HOME_FILE = "instance.lock"
"""Relative to the data dir: the installation's home name, locked while a process runs on it."""
SEPARATOR = "."


def _name() -> str:
    return secrets.token_hex(6)


class Instance:
    """This process's identity in job leases: ``id`` (``<home>.<run>``, new at every start) and ``home``."""

    def __init__(self, home: str | None = None, *, lock: IO[str] | None = None) -> None:
        self.home = home or _name()
        self.id = f"{self.home}{SEPARATOR}{_name()}"
        self._lock = lock

    @property
    def home_prefix(self) -> str:
        """What every lease id of this home starts with (a ``LIKE`` prefix: hex and a dot need no escaping)."""
        return f"{self.home}{SEPARATOR}"

    @classmethod
    def of_data_dir(cls, data_dir: Path) -> Instance:
        """The instance of a process serving ``data_dir``: its home when the lock is free (a restart takes its
        predecessor's jobs back at once), else a home of its own."""
        if fcntl is None:
            return cls()
        data_dir.mkdir(parents=True, exist_ok=True)
        handle = (data_dir / HOME_FILE).open("a+", encoding="ascii")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            log.warning("another process serves the data dir %s; this one waits for the leases of the jobs that "
                        "one held to run out", data_dir)
            return cls()
        handle.seek(0)
        home = handle.read().strip()
        if not (len(home) == 12 and all(c in "0123456789abcdef" for c in home)):
            home = _name()
            handle.seek(0)
            handle.truncate()
            handle.write(home)
            handle.flush()
        return cls(home, lock=handle)

    def release(self) -> None:
        """Let the next process on this data dir take the home (the server stopped)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __repr__(self) -> str:
        return f"Instance({self.id})"
