"""The ``train_lora`` job kind on a worker: the trainer runs as a child process, its files go to the asset store.

Training holds a device for minutes to hours and its memory must be returned in full when it ends, so it runs
out of process (``python -m training --config run.json``, as kohya_ss's GUI runs sd-scripts) rather than in the
worker's engine. For one job the runner:

1. checks the payload, materialises the base model (``ModelFiles``, pinned for the run), copies the dataset from
   the asset store into ``work_dir/<job_id>/dataset`` (kohya's ``N_name`` folders kept; a key that would climb
   out of that folder is refused), fetches ``jobs/<id>/state/state.pt`` when an earlier attempt saved one (a
   restart or a backend stop: the trainer resumes after that epoch), and writes the run file;
2. starts the trainer in its own process group and turns its stdout protocol (one JSON object a line: start,
   step, saved, sample, done, error) into ``Progress`` events at a bounded rate, uploading each epoch's LoRA,
   the resumable state, samples and the final LoRA as they appear; stderr lines become the events' log lines
   and ``jobs/<id>/train.log``;
3. on cancel (or the backend stopping) sends SIGTERM to the group — the trainer stops at the next step without
   a partial save — then SIGKILL after a grace period; whatever was uploaded stays.

The state is deleted from the store once the final LoRA is there. Nothing is kept on the worker's disk: ``work_dir/<job_id>`` is removed when the job ends, however it ends, and
the child is killed if the runner itself fails. Nothing here imports torch or training (the trainer may even
run from another Python environment: the ``training_command`` option).
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from deploy.backends.messages import Cancelled, Event, Failed, JobSpec, Progress, Succeeded
from deploy.jobkinds import RunnerContext
from deploy.model_files import ModelFileError
from deploy.storage import StorageError
from deploy.storage.base import InvalidKey, validate_prefix
from deploy.trainer_process import (
    EXIT_STOPPED,
    TrainerProgress,
    failure_of,
    parse_event,
    pump,
    reap,
    signal_group,
    start_trainer,
)
from deploy.trainer_process import write_run_file as write_trainer_run_file

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]
Check = Callable[[], bool]

BASE_TYPES = ("sd15", "sdxl")
DATASET_ROOT = "datasets/"
POLL_SECONDS = 0.5
"""How often cancel and stop are checked while the trainer runs."""
PROGRESS_INTERVAL = 0.5
"""At most about two step events a second reach the control plane (saves, samples and the end always do)."""
STOP_GRACE_SECONDS = 20.0
"""How long a SIGTERMed trainer gets to reach its next step boundary before SIGKILL."""
MAX_LOG_LINES_PER_EVENT = 200
ERROR_TAIL_LINES = 20
STOPPED = "the worker stopped mid-training; the job resumes from its last saved epoch"
_OUTPUT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
TRAINER_EVENTS = frozenset({"start", "step", "saved", "sample", "done", "error"})
"""The protocol's events (``python -m training``); any other line is logged as printed."""

class InvalidPayload(ValueError):
    """The job's payload (or the dataset it names) cannot be trained on; ``field`` names the culprit."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class TrainPayload:
    """A ``train_lora`` job's payload, checked (see the training contract)."""

    base_type: str
    config: Mapping[str, Any]
    dataset_prefix: str
    output_name: str
    dataset_id: str = ""
    base_model_name: str = ""

    @classmethod
    def parse(cls, payload: Mapping[str, Any]) -> TrainPayload:
        base_type = payload.get("base_type")
        if base_type not in BASE_TYPES:
            raise InvalidPayload(f"`base_type` must be one of {', '.join(BASE_TYPES)}, not {base_type!r}",
                                 "base_type")
        config = payload.get("config")
        if not isinstance(config, Mapping):
            raise InvalidPayload("`config` must be an object of training settings", "config")
        prefix = payload.get("dataset_prefix")
        if not isinstance(prefix, str) or not prefix.startswith(DATASET_ROOT) or not prefix.endswith("/") \
                or len(prefix) <= len(DATASET_ROOT) + 1:
            raise InvalidPayload(f"`dataset_prefix` must be a folder under {DATASET_ROOT} ending in '/', "
                                 f"not {prefix!r}", "dataset_prefix")
        try:
            validate_prefix(prefix)
        except InvalidKey as exc:
            raise InvalidPayload(f"`dataset_prefix` {prefix!r}: {exc}", "dataset_prefix") from None
        name = payload.get("output_name", config.get("output_name", "lora"))
        if not isinstance(name, str) or not _OUTPUT_NAME.fullmatch(name) or ".." in name:
            raise InvalidPayload(f"`output_name` must be 1 to 100 letters, digits, '_', '-' or '.', not {name!r}",
                                 "output_name")
        return cls(base_type=base_type, config=dict(config), dataset_prefix=prefix, output_name=name,
                   dataset_id=str(payload.get("dataset_id") or ""),
                   base_model_name=str(payload.get("base_model_name") or ""))


def job_keys(job_id: str) -> dict[str, str]:
    """Where a training job's files live in the asset store."""
    root = f"jobs/{job_id}"
    return {"root": root, "lora": f"{root}/lora/", "samples": f"{root}/samples/", "state": f"{root}/state/state.pt",
            "log": f"{root}/train.log"}


def dataset_path(prefix: str, key: str) -> PurePosixPath:
    """The relative path of the dataset blob ``key`` inside the dataset copy; ``InvalidPayload`` for a key that
    is not under ``prefix`` or could climb out of the copy (``..``, absolute, backslashes, empty parts)."""
    if not key.startswith(prefix):
        raise InvalidPayload(f"dataset key {key!r} is not under {prefix!r}", "dataset_prefix")
    rest = key[len(prefix):]
    parts = rest.split("/")
    if not rest or rest.startswith("/") or "\\" in rest or "\x00" in rest \
            or any(part in ("", ".", "..") for part in parts):
        raise InvalidPayload(f"dataset key {key!r} is not a plain relative path; refusing to copy it",
                             "dataset_prefix")
    return PurePosixPath(*parts)


@dataclass
class _Run:
    """One training run's state, as the trainer's events arrive."""

    job_id: str
    keys: dict[str, str]
    train_log: Path
    artifacts: list[str] = field(default_factory=list)
    progress: TrainerProgress = field(default_factory=TrainerProgress)
    final_key: str | None = None
    pending_log: list[str] = field(default_factory=list)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=ERROR_TAIL_LINES))
    last_emit: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_log(self, line: str) -> None:
        with self.lock:
            self.pending_log.append(line)
            del self.pending_log[:-MAX_LOG_LINES_PER_EVENT]
            self.tail.append(line)
            with self.train_log.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    def take_log(self) -> tuple[str, ...]:
        with self.lock:
            lines, self.pending_log = tuple(self.pending_log), []
        return lines

    def add_artifact(self, key: str) -> None:
        if key not in self.artifacts:
            self.artifacts.append(key)


def progress_event(job_id: str, progress: TrainerProgress, *, log: tuple[str, ...] = (),
                   artifact_keys: tuple[str, ...] = ()) -> Progress:
    """A training's ``Progress`` as every host reports it (phase ``train``; metrics, log lines, stored files)."""
    return Progress(job_id=job_id, step=progress.step, total=progress.total, eta=progress.eta(), phase="train",
                    metrics=dict(progress.metrics), log=log, artifact_keys=artifact_keys)


class TrainingRunner:
    """Runs ``train_lora`` jobs on one worker (``deploy.jobkinds.build_runner`` builds one per device)."""

    def __init__(self, context: RunnerContext) -> None:
        self.context = context
        self.store = context.model_files.store
        command = context.options.get("training_command")
        if command is not None and (isinstance(command, str) or not command
                                    or not all(isinstance(part, str) and part for part in command)):
            raise ValueError(f"`training_command` must be a non-empty list of strings, not {command!r}")
        self.command: list[str] = list(command) if command else [sys.executable, "-m", "training"]
        self.stop_grace = float(context.options.get("training_stop_grace", STOP_GRACE_SECONDS))

    def release_memory(self) -> bool:
        """Nothing to release: the trainer's memory is its own process's, returned when it exits."""
        return False

    # -- one job ---------------------------------------------------------------------------------------
    def run(self, spec: JobSpec, *, emit: Emit, should_cancel: Check, stopping: Check) -> Event:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", spec.job_id)  # no dots: never ".." or the work dir itself
        if not spec.job_id or len(name) > 128:
            return Failed(job_id=spec.job_id, message=f"job id {spec.job_id!r} cannot name a work folder",
                          kind="bad_request", field="job_id")
        job_dir = self.context.work_dir / name
        try:
            shutil.rmtree(job_dir, ignore_errors=True)  # a crashed earlier attempt's leftovers
            job_dir.mkdir(parents=True)
            return self._run(spec, job_dir, emit, should_cancel, stopping)
        except InvalidPayload as exc:
            return Failed(job_id=spec.job_id, message=str(exc), kind="bad_request", field=exc.field)
        except ModelFileError as exc:
            return Failed(job_id=spec.job_id, message=f"base model unavailable: {exc}", kind="internal")
        except StorageError as exc:
            return Failed(job_id=spec.job_id, message=f"asset store: {exc}", kind="internal")
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)

    def _run(self, spec: JobSpec, job_dir: Path, emit: Emit, should_cancel: Check, stopping: Check) -> Event:
        payload = TrainPayload.parse(spec.payload)
        keys = job_keys(spec.job_id)
        run = _Run(spec.job_id, keys, job_dir / "train.log")
        dirs = {name: job_dir / name for name in ("dataset", "out", "state")}
        for path in dirs.values():
            path.mkdir()
        images = self._copy_dataset(payload.dataset_prefix, dirs["dataset"], should_cancel)
        resumed = self._fetch_state(keys, dirs["state"], run)
        run.add_log(f"[studio] job {spec.job_id}: {images} dataset files from {payload.dataset_prefix}"
                    + (", resuming from the saved state" if resumed else ""))
        with self.context.model_files.pinned(spec.models.checkpoint.file) as (base_model,):
            if images < 0 or should_cancel():  # while the dataset or the model was being fetched
                if stopping():
                    return Failed(job_id=spec.job_id, kind="interrupted", message=STOPPED)
                return Cancelled(job_id=spec.job_id, reason="cancelled before training started",
                                 artifact_keys=tuple(run.artifacts))
            run_file = self._write_run_file(job_dir, payload, base_model, dirs)
            return self._supervise(spec, run, run_file, dirs, emit, should_cancel, stopping)

    def _copy_dataset(self, prefix: str, target: Path, should_cancel: Check) -> int:
        """Download the dataset's blobs into ``target``; the number of files, -1 when cancelled meanwhile."""
        blobs = list(self.store.list(prefix))
        plan = [(blob.key, dataset_path(prefix, blob.key)) for blob in blobs]  # every key checked before copying
        if not plan:
            raise InvalidPayload(f"the dataset {prefix!r} has no files in the asset store", "dataset_prefix")
        root = target.resolve()
        for key, relative in plan:
            path = target.joinpath(*relative.parts)
            if not path.resolve().is_relative_to(root):
                raise InvalidPayload(f"dataset key {key!r} leads outside the dataset folder", "dataset_prefix")
            if should_cancel():
                return -1
            self.store.download_to(key, path)
        return len(plan)

    def _fetch_state(self, keys: Mapping[str, str], state_dir: Path, run: _Run) -> bool:
        """Fetch an earlier attempt's state (and its log and files, so this attempt reports them all)."""
        if not self.store.exists(keys["state"]):
            return False
        self.store.download_to(keys["state"], state_dir / "state.pt")
        if self.store.exists(keys["log"]):
            self.store.download_to(keys["log"], run.train_log)
        for prefix in (keys["lora"], keys["samples"]):
            for blob in self.store.list(prefix):
                run.add_artifact(blob.key)
        return True

    def _write_run_file(self, job_dir: Path, payload: TrainPayload, base_model: Path,
                        dirs: Mapping[str, Path]) -> Path:
        options = self.context.options
        return write_trainer_run_file(job_dir / "run.json", base_type=payload.base_type, config=payload.config,
                                      output_name=payload.output_name, base_model=base_model,
                                      dataset_dir=dirs["dataset"], output_dir=dirs["out"], state_dir=dirs["state"],
                                      device=self.context.device, skeleton_dirs=options.get("skeleton_dirs") or (),
                                      cpu_threads=int(options.get("cpu_threads") or 0))

    # -- the child process -----------------------------------------------------------------------------
    def _supervise(self, spec: JobSpec, run: _Run, run_file: Path, dirs: Mapping[str, Path], emit: Emit,
                   should_cancel: Check, stopping: Check) -> Event:
        lines: queue.Queue[str | None] = queue.Queue()
        try:
            process = start_trainer(self.command, run_file, run_file.parent)
        except OSError as exc:  # the command itself is wrong: the operator's setting, not the job
            return Failed(job_id=spec.job_id, kind="internal",
                          message=f"cannot start the trainer ({' '.join(self.command)}): {exc}")
        readers = [threading.Thread(target=pump, args=(process.stdout, lines.put), daemon=True),
                   threading.Thread(target=pump, args=(process.stderr, run.add_log), daemon=True)]
        for reader in readers:
            reader.start()
        readers.append(threading.Thread(target=lambda: (readers[0].join(), lines.put(None)), daemon=True))
        readers[-1].start()
        stop_reason: str | None = None
        try:
            while True:
                try:
                    line = lines.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line:
                    self._handle(line, run, dirs, emit, quiet=stop_reason is not None)
                if stop_reason is None and should_cancel():
                    stop_reason = "stopping" if stopping() else "cancelled"
                    log.info("training job %s: %s; stopping the trainer", spec.job_id, stop_reason)
                    self._terminate(process)
            process.wait()
        finally:
            code = reap(process)
            for reader in readers[1:]:
                reader.join(timeout=5)
        run.add_log(f"[studio] trainer exited with code {code}")
        try:
            self._upload(run.train_log, run.keys["log"], run, content_type="text/plain; charset=utf-8")
        except StorageError as exc:  # the outcome matters more than its log
            log.warning("training job %s: could not upload its log: %s", spec.job_id, exc)
        return self._outcome(spec, run, code, stop_reason)

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM the trainer's group; SIGKILL it if it has not exited after the grace period (in a thread, so
        the events it still prints — a save that was finishing — are read meanwhile)."""
        signal_group(process, signal.SIGTERM)

        def kill_late() -> None:
            try:
                process.wait(timeout=self.stop_grace)
            except subprocess.TimeoutExpired:
                log.warning("trainer %d ignored SIGTERM for %.0fs; killing it", process.pid, self.stop_grace)
                signal_group(process, signal.SIGKILL)

        threading.Thread(target=kill_late, daemon=True).start()

    def _outcome(self, spec: JobSpec, run: _Run, code: int, stop_reason: str | None) -> Event:
        job_id = spec.job_id
        done = run.progress.done
        if code == 0 and done is not None and run.final_key is not None:  # finished before the stop landed
            info = {"lora": run.final_key, "epochs": int(done.get("epoch") or run.progress.epochs),
                    "steps": int(done.get("step") or run.progress.step)}
            self.store.delete(run.keys["state"])  # resume data: no use once the final LoRA is stored
            return Succeeded(job_id=job_id, info=info, artifact_keys=tuple(run.artifacts))
        if stop_reason == "cancelled":
            return Cancelled(job_id=job_id, reason="cancelled while training", artifact_keys=tuple(run.artifacts))
        if stop_reason == "stopping":
            return Failed(job_id=job_id, kind="interrupted", message=STOPPED)
        if code == EXIT_STOPPED:
            return Failed(job_id=job_id, kind="interrupted",
                          message="the trainer was stopped from outside the studio; the job resumes from its "
                                  "last saved epoch")
        failure = failure_of(code, run.progress.error, "\n".join(run.tail))
        return Failed(job_id=job_id, kind=failure.kind, message=failure.message, field=failure.field)

    # -- the trainer's events --------------------------------------------------------------------------
    def _handle(self, line: str, run: _Run, dirs: Mapping[str, Path], emit: Emit, quiet: bool) -> None:
        event = parse_event(line)
        if event is None:
            run.add_log(line)  # something printed to stdout besides the protocol
            return
        kind = event["event"]
        if kind not in TRAINER_EVENTS:
            run.add_log(line)
            return
        always = run.progress.apply(event)
        if kind == "saved":
            self._upload_output(event.get("lora"), run.keys["lora"], dirs["out"], run, artifact=True)
            self._upload_output(event.get("state"), run.keys["state"], dirs["state"], run, artifact=False,
                                keep_name=False)
        elif kind == "sample":
            self._upload_output(event.get("path"), run.keys["samples"], dirs["out"], run, artifact=True,
                                content_type="image/png")
        elif kind == "done":
            run.final_key = self._upload_output(event.get("lora"), run.keys["lora"], dirs["out"], run, artifact=True)
        elif kind == "error":
            run.add_log(f"[trainer] error: {event.get('message')}")
            return
        now = time.monotonic()
        if quiet or (not always and now - run.last_emit < PROGRESS_INTERVAL):
            return
        run.last_emit = now
        emit(progress_event(run.job_id, run.progress, log=run.take_log(), artifact_keys=tuple(run.artifacts)))

    def _upload_output(self, reported: Any, key_or_prefix: str, root: Path, run: _Run, *, artifact: bool,
                       keep_name: bool = True, content_type: str = "application/octet-stream") -> str | None:
        """Upload a file the trainer reported (it must lie inside ``root``); returns its key."""
        if not isinstance(reported, str) or not reported:
            run.add_log(f"[studio] the trainer reported no file for {key_or_prefix}")
            return None
        path = Path(reported)
        if not path.resolve().is_relative_to(root.resolve()) or not path.is_file():
            run.add_log(f"[studio] ignoring {reported!r}: not a file in {root.name}/")
            return None
        if keep_name and not _FILE_NAME.fullmatch(path.name):
            run.add_log(f"[studio] ignoring {reported!r}: unexpected file name")
            return None
        key = f"{key_or_prefix}{path.name}" if keep_name else key_or_prefix
        self._upload(path, key, run if artifact else None, content_type=content_type)
        return key

    def _upload(self, path: Path, key: str, run: _Run | None, *, content_type: str) -> None:
        self.store.put_file(key, path, content_type=content_type)
        if run is not None:
            run.add_artifact(key)


