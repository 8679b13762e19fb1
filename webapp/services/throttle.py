"""Failed-login rate limiting per user name and per client address (sliding window)."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable

from webapp.services.errors import Throttled


class LoginThrottle:
    """Counts failures in a sliding window; past the limit, further attempts get 429 until it slides.

    A success clears the user's counter but not the address's: one valid account must not let an
    attacker reset the budget for guessing other accounts from the same address.
    """

    def __init__(
        self, *, max_per_user: int, max_per_address: int, window_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = {"user": max_per_user, "address": max_per_address}
        self._window = window_seconds
        self._clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _keys(self, username: str, address: str | None) -> list[tuple[str, str]]:
        keys = [("user", username.lower())]
        if address:
            keys.append(("address", address))
        return keys

    def _prune(self, key: tuple[str, str], now: float) -> deque[float]:
        q = self._failures[key]
        while q and q[0] <= now - self._window:
            q.popleft()
        return q

    def check(self, username: str, address: str | None) -> None:
        now = self._clock()
        with self._lock:
            for key in self._keys(username, address):
                q = self._prune(key, now)
                if len(q) >= self._limits[key[0]]:
                    retry_after = max(1, math.ceil(q[0] + self._window - now))
                    raise Throttled(
                        f"too many failed logins for this {key[0]}; try again in {retry_after} s",
                        retry_after=retry_after,
                    )

    def record_failure(self, username: str, address: str | None) -> None:
        now = self._clock()
        with self._lock:
            for key in self._keys(username, address):
                self._prune(key, now).append(now)

    def record_success(self, username: str) -> None:
        with self._lock:
            self._failures.pop(("user", username.lower()), None)
