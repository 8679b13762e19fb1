"""The local backend: one worker thread per device of this machine, each with its own engine.

``devices="auto"`` means every CUDA device (counted without importing torch, from the NVIDIA driver's
/proc entries or ``/dev/nvidiaN`` nodes, and ``CUDA_VISIBLE_DEVICES``) or one CPU worker where there is
none. Each worker thread owns a ``deploy.runner.JobRunner`` (the same runner the serving container uses),
which imports torch and builds its engine when the first job arrives — never on the app's start-up path.
With ``share_training_device`` a device running a training also takes one generation job (``workers.py``).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from deploy.backends.base import BackendNotConfigured, Capabilities, engine_lists
from deploy.backends.messages import Event, JobSpec, Started
from deploy.backends.registry import BackendConfig
from deploy.backends.workers import ThreadedBackend, Worker
from deploy.jobkinds import GENERATE, TRAIN_LORA, KindRunner, RunnerContext, build_runner
from deploy.model_files import ModelFiles
from deploy.runner import JobRunner, RunnerConfig, RunnerStopped

log = logging.getLogger(__name__)

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")
DEV_DIR = Path("/dev")
_DEVICE_NODE = re.compile(r"nvidia\d+")


def _count_gpus(proc_dir: Path, dev_dir: Path) -> int:
    """The driver's /proc entries; containers often lack them but get the ``/dev/nvidiaN`` nodes."""
    try:
        if proc_dir.is_dir():
            found = len([p for p in proc_dir.iterdir() if p.is_dir()])
            if found:
                return found
        return len([p for p in dev_dir.iterdir() if _DEVICE_NODE.fullmatch(p.name)]) if dev_dir.is_dir() else 0
    except OSError:
        return 0


def detect_devices(environ: dict[str, str] | None = None, proc_dir: Path = NVIDIA_PROC,
                   dev_dir: Path = DEV_DIR) -> list[str]:
    """CUDA devices visible to this process, without importing torch; ``["cpu"]`` when there are none."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    present = _count_gpus(proc_dir, dev_dir)
    if visible is not None:
        entries = [v for v in visible.split(",") if v.strip() and not v.strip().startswith("-")]
        present = min(present, len(entries)) if present else 0
    return [f"cuda:{i}" for i in range(present)] or ["cpu"]


def parse_devices(value: str | Sequence[str] | None) -> list[str] | None:
    """``"auto"``/None → None (detect at start); ``"cuda:0,cuda:1"`` or a list → that list."""
    if value is None:
        return None
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v and v.strip()]
    if not items or items == ["auto"]:
        return None
    for item in items:
        if item.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"`devices` entry {item!r} is not cpu, cuda, cuda:N or mps")
    return items


class LocalBackend(ThreadedBackend):
    kind = "local"

    def __init__(self, name: str, *, model_files: ModelFiles | None, devices: str | Sequence[str] | None = "auto",
                 skeleton_dirs: Sequence[str | Path] = (), cache_gb: float | None = None, preview_every: int = 5,
                 dtype: str | None = None, cpu_threads: int | None = None,
                 annotators_dir: str | Path | None = None, work_dir: str | Path | None = None,
                 training_command: Sequence[str] | None = None, share_training_device: bool = False) -> None:
        super().__init__(name, share_training_device=share_training_device)
        self.model_files = model_files
        self._explicit = parse_devices(devices)
        self.devices = self._explicit or detect_devices()
        self.skeleton_dirs = tuple(Path(d) for d in skeleton_dirs)
        if cache_gb is not None and cache_gb <= 0:
            raise ValueError(f"`pipeline_cache_gb` must be positive, got {cache_gb}")
        self.cache_bytes = int(cache_gb * 1024**3) if cache_gb is not None else None  # None: from the device
        self.preview_every = max(0, int(preview_every))
        self.dtype = dtype
        self.cpu_threads = cpu_threads
        self.annotators_dir = Path(annotators_dir) if annotators_dir else None  # ControlNet preprocessor weights
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "studio-work"
        """Scratch space of non-generate jobs (a training's dataset copy and outputs), one folder per worker."""
        self.training_command = list(training_command) if training_command else None
        """What starts the LoRA trainer instead of ``python -m training`` (e.g. another environment's Python:
        ``["/opt/train-env/bin/python", "-m", "training"]``). An operator's setting — ``STUDIO_TRAINING_COMMAND``
        for backends built from configuration — never an endpoint option, which administrators edit over HTTP."""
        self._runners: dict[str, JobRunner] = {}
        self._kind_runners: dict[tuple[str, str], KindRunner] = {}

    def is_configured(self) -> bool:
        return self.model_files is not None

    def capabilities(self) -> Capabilities:
        return Capabilities(slots=len(self.devices), remote=False, previews=self.preview_every > 0,
                            devices=tuple(self.devices), kinds=(GENERATE, TRAIN_LORA), **engine_lists())

    def worker_labels(self) -> list[str]:
        if self.model_files is None:
            raise BackendNotConfigured("the local backend needs a model file cache (ModelFiles)")
        return list(self.devices)

    def runner(self, worker: Worker) -> JobRunner:
        """The device's generation runner. A guest worker (``share_training_device``) gets its device's runner:
        it runs only while the main worker trains, so one engine per device serves one thread at a time."""
        runner = self._runners.get(worker.label)
        if runner is None:
            assert self.model_files is not None
            config = RunnerConfig(skeleton_dirs=self.skeleton_dirs, cache_bytes=self.cache_bytes,
                                  preview_every=self.preview_every, dtype=self.dtype, cpu_threads=self.cpu_threads,
                                  annotators_dir=self.annotators_dir)
            runner = self._runners[worker.label] = JobRunner(worker.label, model_files=self.model_files,
                                                             config=config, auto=self._explicit is None)
        return runner

    def kind_runner(self, worker: Worker, kind: str) -> KindRunner:
        """The worker's runner of a non-generate job kind (built on its first job of that kind)."""
        runner = self._kind_runners.get((worker.label, kind))
        if runner is None:
            assert self.model_files is not None
            work_dir = self.work_dir / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.name}-{worker.label}")
            work_dir.mkdir(parents=True, exist_ok=True)
            options = {"skeleton_dirs": [str(d) for d in self.skeleton_dirs], "dtype": self.dtype,
                       "cpu_threads": self.cpu_threads, "training_command": self.training_command}
            context = RunnerContext(device=worker.label, model_files=self.model_files, work_dir=work_dir,
                                    options=options)
            runner = self._kind_runners[(worker.label, kind)] = build_runner(kind, context)
        return runner

    @property
    def runners(self) -> dict[str, JobRunner]:
        """The runners built so far, by worker label (one per device that has run a job)."""
        return dict(self._runners)

    def release_memory(self) -> None:
        for label, runner in list(self._runners.items()):
            if runner.release_memory():
                log.info("local worker %s: loaded models released", label)
        for (label, kind), kind_runner in list(self._kind_runners.items()):
            if kind_runner.release_memory():
                log.info("local worker %s: %s runner released its memory", label, kind)

    def run_job(self, worker: Worker, spec: JobSpec) -> Event:
        self.emit(Started(job_id=spec.job_id, worker=f"{self.name}/{worker.label}"))
        if spec.kind != GENERATE:
            return self.kind_runner(worker, spec.kind).run(
                spec, emit=self.emit, should_cancel=self.cancel_check(spec.job_id), stopping=lambda: self.stopping)
        try:
            return self.runner(worker).run(spec, emit=self.emit, should_cancel=self.cancel_check(spec.job_id),
                                           should_skip=self.skip_check(spec.job_id), stopping=lambda: self.stopping)
        except RunnerStopped:
            return self.stopped_event(spec.job_id)


def create(config: BackendConfig) -> LocalBackend:
    from deploy.backends.options import parse_options, plain_options

    options = plain_options(parse_options("local", config.options))
    return LocalBackend(config.name, model_files=config.model_files, training_command=training_command(), **options)


TRAINING_COMMAND_ENV = "STUDIO_TRAINING_COMMAND"


def training_command(environ: dict[str, str] | None = None) -> list[str] | None:
    """The operator's trainer command from ``STUDIO_TRAINING_COMMAND`` (a JSON list of strings, or a command line
    split like a shell's); None when unset (``python -m training`` in this environment)."""
    import json
    import shlex

    value = (os.environ if environ is None else environ).get(TRAINING_COMMAND_ENV, "").strip()
    if not value:
        return None
    parts = json.loads(value) if value.startswith("[") else shlex.split(value)
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"{TRAINING_COMMAND_ENV} must be a command line or a JSON list of strings, not {value!r}")
    return parts
