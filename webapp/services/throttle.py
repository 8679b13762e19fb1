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

The counters are rows (``login_attempt``), not process memory: several studio instances behind one load
balancer share one database, and a throttle per process would give an attacker the limit once per
instance. Each ``reserve`` is one write transaction (serialised across instances, see ``webapp.db``) that
also deletes every row older than the window, so the table stays as small as the last window's failures.
The clock is wall-clock time, the one clock every instance shares.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlmodel import Session, col, delete, func, select

from webapp.db import Database
from webapp.records import LoginAttempt
from webapp.services.errors import Throttled

Key = tuple[str, ...]


@dataclass(frozen=True)
class Attempt:
    """A reserved attempt: counted as a failure until ``LoginThrottle.succeeded`` forgives it."""

    keys: tuple[Key, ...]
    at: float
    row_ids: tuple[int, ...]


def _hash(key: Key) -> str:
    return hashlib.sha256("\x1f".join(key).encode()).hexdigest()


class LoginThrottle:
    def __init__(
        self, db: Database, *, max_per_user: int, max_per_address: int, window_seconds: float,
        max_per_account: int = 100, clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._limits = {"pair": max_per_user, "address": max_per_address}
        self._max_per_account = max_per_account
        self._window = window_seconds
        self._clock = clock

    @staticmethod
    def _keys(username: str, address: str | None) -> tuple[Key, Key | None, Key]:
        user = username.strip().lower()
        return ("pair", user, address or ""), (("address", address) if address else None), ("account", user)

    @staticmethod
    def _failures(s: Session, key: Key) -> tuple[int, float | None]:
        """How many attempts ``key`` has inside the window, and when the oldest was."""
        count, oldest = s.exec(select(func.count(), func.min(LoginAttempt.at))
                               .where(LoginAttempt.key_hash == _hash(key))).one()
        return int(count), oldest

    def reserve(self, username: str, address: str | None) -> Attempt:
        """Count an attempt before verifying it; raises Throttled when it must not be tried now."""
        pair, by_address, account = self._keys(username, address)
        paced = ("paced", account[1])  # one row: when this account's last paced attempt was let through
        with self._db.write() as s:
            now = self._clock()  # inside the write transaction: every instance's rows stay in time order
            s.exec(delete(LoginAttempt).where(col(LoginAttempt.at) <= now - self._window))
            for key, what in ((pair, "this user from your address"), (by_address, "your address")):
                if key is None:
                    continue
                count, oldest = self._failures(s, key)
                if count >= self._limits[key[0]]:
                    retry_after = max(1, math.ceil(oldest + self._window - now))
                    raise Throttled(f"too many failed logins for {what}; try again in {retry_after} s",
                                    retry_after=retry_after)
            last_paced = s.exec(select(func.max(LoginAttempt.at)).where(LoginAttempt.key_hash == _hash(paced))).one()
            s.exec(delete(LoginAttempt).where(col(LoginAttempt.key_hash) == _hash(paced)))
            if self._failures(s, account)[0] >= self._max_per_account:
                spacing = self._window / self._max_per_account
                waited = now - (last_paced if last_paced is not None else -math.inf)
                if waited < spacing:
                    retry_after = max(1, math.ceil(spacing - waited))
                    raise Throttled(f"many failed logins for this user; attempts are spaced out, try again in "
                                    f"{retry_after} s", retry_after=retry_after)
                s.add(LoginAttempt(key_hash=_hash(paced), at=now))
            keys = tuple(k for k in (pair, by_address, account) if k is not None)
            rows = [LoginAttempt(key_hash=_hash(key), at=now) for key in keys]
            s.add_all(rows)
            s.flush()
            return Attempt(keys=keys, at=now, row_ids=tuple(row.id for row in rows if row.id is not None))

    def succeeded(self, attempt: Attempt) -> None:
        """The reserved attempt was the right password: forgive it and that user's failures from that address."""
        with self._db.write() as s:
            s.exec(delete(LoginAttempt).where(col(LoginAttempt.id).in_(attempt.row_ids)))
            s.exec(delete(LoginAttempt).where(col(LoginAttempt.key_hash) == _hash(attempt.keys[0])))
