"""The registry of job kinds: what a job does, which modes it has, and what runs it on a worker.

A job is ``generate`` (an A1111-shaped txt2img/img2img/inpaint request, run by ``deploy.runner.JobRunner``) or
another kind such as ``train_lora``, whose ``JobSpec.payload`` only its own runner reads. The control plane
stores and dispatches every kind the same way (the job row, the queue, events with ``metrics``, ``log`` and
``artifact_keys``); a backend declares the kinds it runs (``Capabilities.kinds``) and builds the runner of a
non-generate kind here, by name, on first use. Nothing else in the job pipeline special-cases a kind.

Nothing here imports torch, training or webapp: runners are imported lazily from ``JobKind.runner``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from deploy.backends.messages import Event, JobSpec
    from deploy.model_files import ModelFiles

GENERATE = "generate"
TRAIN_LORA = "train_lora"


@dataclass(frozen=True)
class JobKind:
    name: str
    modes: tuple[str, ...]
    """The job modes of this kind (``Job.mode``): generate has txt2img/img2img/inpaint, train_lora has train."""
    runner: str | None = None
    """``module:attr`` of the kind's ``KindRunner`` factory, imported on first use (None: the generation runner)."""
    description: str = ""


@dataclass(frozen=True)
class RunnerContext:
    """What a kind's runner gets, once per worker (device)."""

    device: str
    """``cpu``, ``cuda:0`` ..."""
    model_files: ModelFiles
    """Materialises a spec's ``ModelSpec``s; ``model_files.store`` is the asset store (datasets, artifacts)."""
    work_dir: Path
    """A private scratch directory for this worker's jobs (created; the runner cleans what it makes)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """The backend's plain options (skeleton_dirs, dtype, cpu_threads ...)."""


class KindRunner(Protocol):
    def run(self, spec: JobSpec, *, emit: Callable[[Event], None], should_cancel: Callable[[], bool],
            stopping: Callable[[], bool]) -> Event:
        """Run ``spec``, emitting ``Progress``; return the terminal event. ``should_cancel`` → ``Cancelled`` (keeping
        the artifacts made so far); ``stopping`` (the backend shuts down) → ``Failed(kind="interrupted")``."""

    def release_memory(self) -> bool:
        """Drop what it holds loaded; True when something was released."""


_KINDS: dict[str, JobKind] = {}
_LOCK = threading.Lock()


def register_kind(kind: JobKind) -> None:
    """Add (or replace) a kind; its modes must not belong to another kind."""
    with _LOCK:
        for other in _KINDS.values():
            clash = set(other.modes) & set(kind.modes)
            if other.name != kind.name and clash:
                raise ValueError(f"modes {sorted(clash)} already belong to job kind {other.name!r}")
        _KINDS[kind.name] = kind


def get_kind(name: str) -> JobKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown job kind {name!r}; known: {', '.join(_KINDS)}") from None


def kind_names() -> tuple[str, ...]:
    return tuple(_KINDS)


def kind_of_mode(mode: str) -> JobKind:
    for kind in _KINDS.values():
        if mode in kind.modes:
            return kind
    raise ValueError(f"no job kind has mode {mode!r}")


def build_runner(kind: str, context: RunnerContext) -> KindRunner:
    """The runner of a non-generate ``kind`` for one worker (its module imported now)."""
    target = get_kind(kind).runner
    if target is None:
        raise ValueError(f"job kind {kind!r} is run by the generation runner, not a kind runner")
    module, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    return factory(context)


register_kind(JobKind(GENERATE, ("txt2img", "img2img", "inpaint"), description="image generation (A1111 request)"))
register_kind(JobKind(TRAIN_LORA, ("train",), runner="deploy.training_runner:TrainingRunner",
                      description="LoRA training (kohya-format output)"))
