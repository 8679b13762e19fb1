"""What a running job reports besides its progress bar: metrics, log lines and the files it has written.

Any job kind may send them on its ``Progress`` events (a training's loss and learning rate, its log, the
epoch LoRAs and samples it stored); the dispatcher keeps one ``JobReport`` per running job here and writes it
to the job's row (``metrics_json``, ``log_tail``, ``artifact_keys_json``) with the progress it writes now and
then, and at the end. A job that runs again (requeued after a restart, resumed) starts from what its row holds,
so the history survives restarts; a rewound step (a run resumed from an earlier save) drops the later points.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

MAX_HISTORY = 2000
"""Metric points kept per job: past it, every other point of the older half is dropped (the plot keeps its shape)."""
LOG_LINES = 200
"""Log lines kept per job (the tail the UI shows)."""


class JobReport:
    def __init__(self, *, metrics: Mapping[str, Any] | None = None, log_lines: Iterable[str] = (),
                 artifact_keys: Iterable[str] = ()) -> None:
        stored = dict(metrics or {})
        self.latest: dict[str, Any] = dict(stored.get("latest") or {})
        self.history: list[dict[str, Any]] = [dict(p) for p in stored.get("history") or () if isinstance(p, Mapping)]
        self.log: deque[str] = deque(log_lines, maxlen=LOG_LINES)
        self.artifacts: list[str] = list(dict.fromkeys(artifact_keys))
        self.changed = False

    def add(self, *, step: int, metrics: Mapping[str, Any], log: Iterable[str], artifact_keys: Iterable[str]) -> None:
        if metrics:
            point = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, int | float)}}
            while self.history and self.history[-1].get("step", -1) >= step:
                self.history.pop()  # a resumed run starts again from an earlier step
            self.history.append(point)
            if len(self.history) > MAX_HISTORY:
                half = len(self.history) // 2
                self.history = self.history[:half:2] + self.history[half:]
            self.latest = dict(point)
            self.changed = True
        for line in log:
            self.log.append(line)
            self.changed = True
        for key in artifact_keys:
            if key not in self.artifacts:
                self.artifacts.append(key)
                self.changed = True

    def columns(self) -> dict[str, Any]:
        """The row's columns for what was reported (only those the job used)."""
        values: dict[str, Any] = {}
        if self.latest or self.history:
            values["metrics_json"] = json.dumps({"latest": self.latest, "history": self.history})
        if self.log:
            values["log_tail"] = "\n".join(self.log)
        if self.artifacts:
            values["artifact_keys_json"] = json.dumps(self.artifacts)
        return values
