"""Failed-login rate limiting (sliding window), per user name *from one address*, per address, per account.

The three counters and why:

* **user + address** (``max_per_user``): the ordinary lockout. It is per address so that someone
  guessing a user's password locks out *their own* address, not the owner, who signs in from elsewhere.
* **address** (``max_per_address``): one address guessing many user names.
* **account** (``max_per_account``, all addresses together): bounds what a botnet gets by spreading
  guesses over many addresses. Past it the account is *slowed*, not locked: attempts for that user
  name are spaced ``window / max_per_account`` seconds apart, so total guessing stays at that rate while
  the owner, from an address that has not failed, gets in after a wait of seconds (429 + Retry-After).

An attempt is **reserved** (counted as a failure) atomically before the password is verified, and
forgiven when it succeeds: N parallel guesses can therefore verify at most the limit, where checking
first and recording afterwards let every parallel guess through the check. A success also clears the
failures of that user from that address, but never the address's or the account's counters: a valid
login must not refill an attacker's budget for other accounts or from other addresses.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from webapp.services.errors import Throttled

Key = tuple[str, ...]


@dataclass(frozen=True)
class Attempt:
    """A reserved attempt: counted as a failure until ``LoginThrottle.succeeded`` forgives it."""

    keys: tuple[Key, ...]
    at: float


class LoginThrottle:
    def __init__(
        self, *, max_per_user: int, max_per_address: int, window_seconds: float, max_per_account: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = {"pair": max_per_user, "address": max_per_address}
        self._max_per_account = max_per_account
        self._window = window_seconds
        self._clock = clock
        self._failures: dict[Key, deque[float]] = {}
        self._last_paced: dict[str, float] = {}  # account -> when its last paced attempt was let through
        self._lock = threading.Lock()

    @staticmethod
    def _keys(username: str, address: str | None) -> tuple[Key, Key | None, Key]:
        user = username.strip().lower()
        return ("pair", user, address or ""), (("address", address) if address else None), ("account", user)

    def _count(self, key: Key, now: float) -> deque[float]:
        """The failures of ``key`` still inside the window (empty counters are dropped: no unbounded growth)."""
        q = self._failures.get(key, deque())
        while q and q[0] <= now - self._window:
            q.popleft()
        if not q:
            self._failures.pop(key, None)
        return q

    def reserve(self, username: str, address: str | None) -> Attempt:
        """Count an attempt before verifying it; raises Throttled when it must not be tried now."""
        pair, by_address, account = self._keys(username, address)
        with self._lock:
            now = self._clock()  # under the lock: every counter stays in time order
            for key, what in ((pair, "this user from your address"), (by_address, "your address")):
                if key is None:
                    continue
                q = self._count(key, now)
                if len(q) >= self._limits[key[0]]:
                    retry_after = max(1, math.ceil(q[0] + self._window - now))
                    raise Throttled(f"too many failed logins for {what}; try again in {retry_after} s",
                                    retry_after=retry_after)
            if len(self._count(account, now)) >= self._max_per_account:
                spacing = self._window / self._max_per_account
                waited = now - self._last_paced.get(account[1], -math.inf)
                if waited < spacing:
                    retry_after = max(1, math.ceil(spacing - waited))
                    raise Throttled(f"many failed logins for this user; attempts are spaced out, try again in "
                                    f"{retry_after} s", retry_after=retry_after)
                self._last_paced[account[1]] = now
            else:
                self._last_paced.pop(account[1], None)
            keys = tuple(k for k in (pair, by_address, account) if k is not None)
            for key in keys:
                self._failures.setdefault(key, deque()).append(now)
        return Attempt(keys=keys, at=now)

    def succeeded(self, attempt: Attempt) -> None:
        """The reserved attempt was the right password: forgive it and that user's failures from that address."""
        with self._lock:
            for key in attempt.keys:
                q = self._failures.get(key)
                if q is not None and attempt.at in q:
                    q.remove(attempt.at)
            self._failures.pop(attempt.keys[0], None)
