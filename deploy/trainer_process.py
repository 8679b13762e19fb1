"""The trainer as a child process, shared by every host that runs one: the local backend's ``train_lora`` runner
(``deploy.training_runner``) and the SageMaker training container (``deploy.container.train``).

Both write the same run file, start ``python -m training`` the same way (its own process group, unbuffered, air
gapped, ``training`` importable from any working directory), read its stdout protocol line by line and turn an
exit that is neither done nor stopped into one failure (kind, message, field). What they do with the events
differs — the runner uploads files and emits ``Progress``, the container appends to the checkpoint folder that
SageMaker syncs to S3 — so that stays with each of them; what the events say of the run's progress (steps,
epochs, loss and learning rate: ``TrainerProgress``) is read the same way by the runner and by the studio's
SageMaker backend, which reads them back from that folder. Nothing here imports torch or training.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

EXIT_DONE, EXIT_FAILED, EXIT_INVALID, EXIT_STOPPED = 0, 1, 2, 3
"""``python -m training``'s exit codes (see training/__main__.py)."""

_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_live_trainers() -> None:
    """A process that exits normally mid-training takes its trainers with it (their groups are their own)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for process in live:
        signal_group(process, signal.SIGKILL)


def signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def pump(stream: IO[bytes], sink: Callable[[str], None]) -> None:
    """Feed ``stream``'s lines to ``sink`` until EOF (one thread per pipe, so neither pipe can fill up)."""
    try:
        for raw in iter(stream.readline, b""):
            sink(raw.decode("utf-8", "replace").rstrip("\r\n"))
    finally:
        stream.close()


def write_run_file(path: Path, *, base_type: str, config: Mapping[str, Any], output_name: str, base_model: Path,
                   dataset_dir: Path, output_dir: Path, state_dir: Path, device: str,
                   skeleton_dirs: Sequence[str | Path] = (), cpu_threads: int = 0) -> Path:
    """Write the trainer's run file (JSON: ``[run]`` as the host decides it, ``[config]`` the user's settings
    with the job's output name); ``.partial`` then rename, so the trainer never reads half a file."""
    run = {"base_model": str(base_model.resolve()), "base_type": base_type,
           "train_data_dir": str(dataset_dir.resolve()), "output_dir": str(output_dir.resolve()),
           "state_dir": str(state_dir.resolve()), "device": device,
           "skeleton_dirs": [str(Path(d).resolve()) for d in skeleton_dirs], "cpu_threads": int(cpu_threads)}
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"run": run, "config": {**config, "output_name": output_name}}, indent=2),
                       encoding="utf-8")
    partial.replace(path)
    return path


def start_trainer(command: Sequence[str], run_file: Path, cwd: Path, *,
                  stderr: int | None = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """Start ``command --config run_file`` in its own process group with stdout piped (the protocol); stderr is
    piped unless the caller passes another target. Raises ``OSError`` when the command cannot start."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")  # air-gapped: models come from the run file, never a hub
    project = str(Path(__file__).resolve().parent.parent)  # so `-m training` resolves from any cwd
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project, env.get("PYTHONPATH")) if p)
    process = subprocess.Popen([*command, "--config", str(run_file)], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=stderr, process_group=0)
    with _LIVE_LOCK:
        _LIVE.add(process)
    return process


def reap(process: subprocess.Popen[bytes]) -> int:
    """Make sure the trainer and anything it started are gone; its exit code."""
    if process.poll() is None:
        signal_group(process, signal.SIGKILL)
        process.wait()
    signal_group(process, signal.SIGKILL)  # anything the trainer started and left behind
    with _LIVE_LOCK:
        _LIVE.discard(process)
    return int(process.returncode)


def parse_event(line: str) -> dict[str, Any] | None:
    """One protocol line as an event object, or None for anything else the trainer printed."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return None
    return event


@dataclass(frozen=True)
class TrainerFailure:
    """Why a trainer run failed, in the terms of ``deploy.backends.messages.Failed``."""

    kind: str
    """``bad_request`` (exit 2: the config, dataset or base model), ``oom`` or ``internal``."""
    message: str
    field: str | None = None


def failure_of(code: int, error: Mapping[str, Any] | None, tail: str) -> TrainerFailure:
    """The failure a trainer exit that is neither done (with a final LoRA) nor stopped (3) stands for; ``error``
    is its last ``error`` event, ``tail`` the last lines of its stderr."""
    if code == EXIT_INVALID:
        name = (error or {}).get("field")
        message = str((error or {}).get("message") or tail or "the trainer refused its input")
        if name and f"`{name}`" not in message:
            message = f"`{name}`: {message}"
        return TrainerFailure("bad_request", message, str(name) if name else None)
    if code == EXIT_DONE:
        return TrainerFailure("internal", f"the trainer exited without a final LoRA\n{tail}")
    reported = str((error or {}).get("message") or "")
    memory = any(word in f"{reported}\n{tail}".lower() for word in ("out of memory", "outofmemoryerror"))
    how = f"was killed by signal {-code}" if code < 0 else f"failed (exit code {code})"
    summary = f"the trainer {how}: {reported}" if reported else f"the trainer {how}"
    return TrainerFailure("oom" if memory else "internal", f"{summary}\n{tail}")


_REASON = re.compile(r"\[studio:(?P<kind>[a-z_]+)(?::(?P<field>[A-Za-z0-9_.\-]+))?\] ?(?P<message>.*)", re.S)


def failure_reason(failure: TrainerFailure) -> str:
    """A failure as one tagged paragraph (what the training container writes to ``/opt/ml/output/failure``,
    which SageMaker shows as the job's ``FailureReason``): ``[studio:<kind>:<field>] message``."""
    tag = f"studio:{failure.kind}" + (f":{failure.field}" if failure.field else "")
    return f"[{tag}] " + " ".join(failure.message.split())


def parse_failure_reason(text: str) -> TrainerFailure | None:
    """The failure tagged by ``failure_reason`` anywhere in ``text`` (SageMaker may prefix and truncate it), or
    None when the text was not written by the studio (SageMaker's own reasons: capacity, image, timeouts)."""
    found = _REASON.search(text or "")
    if found is None:
        return None
    return TrainerFailure(found["kind"], found["message"].strip(), found["field"])


@dataclass
class TrainerProgress:
    """Where a run stands, as its protocol events tell it: steps, epochs, the latest metrics (loss, loss_avg, lr,
    epoch), and its ``done`` / ``error`` event. One reading of the protocol for every host that reports a
    training's progress, so a job's metrics look the same whether it trained here or on SageMaker."""

    step: int = 0
    total: int = 0
    start_step: int = 0
    """The step a resumed run started after (its ETA counts only the steps it trains)."""
    epochs: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    done: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    started: float = field(default_factory=time.monotonic)

    def apply(self, event: Mapping[str, Any]) -> bool:
        """Take one event into account; False for a step (a host may rate-limit those), True for the events
        that must always be reported (start, saved, sample, done, error and any other)."""
        kind = event.get("event")
        if kind == "start":
            self.total = int(event.get("total_steps") or 0)
            self.epochs = int(event.get("epochs") or 0)
            self.step = self.start_step = int(event.get("resumed_epoch") or 0) * int(event.get("steps_per_epoch") or 0)
            self.started = time.monotonic()
            self.metrics["epoch"] = float(event.get("resumed_epoch") or 0)
        elif kind == "step":
            self.step = int(event.get("step") or self.step)
            self.total = int(event.get("total") or self.total)
            self.metrics.update({name: float(event[name]) for name in ("loss", "loss_avg", "lr", "epoch")
                                 if isinstance(event.get(name), int | float) and not isinstance(event[name], bool)})
            return False
        elif kind == "done":
            self.done = dict(event)
            self.step = int(event.get("step") or self.step)
        elif kind == "error":
            self.error = dict(event)
        return True

    def eta(self) -> float | None:
        done = self.step - self.start_step
        if done <= 0 or self.total <= 0:
            return None
        return max(0.0, (time.monotonic() - self.started) / done * (self.total - self.step))
