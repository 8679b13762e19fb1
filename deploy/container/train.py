"""``python -m deploy.container train``: one ``train_lora`` job as a SageMaker training job.

SageMaker runs ``docker run <image> train`` with the job's inputs laid out under ``/opt/ml`` (``--ml-root``):

- ``input/config/hyperparameters.json`` (every value a string): ``payload`` holds the ``train_lora`` payload as
  JSON, exactly as ``deploy.training_runner.TrainPayload`` checks it (base_type, config, output_name ...). A
  payload longer than one value allows (2,500 characters) continues in ``payload_1``, ``payload_2`` ...;
  ``payload_hyperparameters`` / ``payload_from_hyperparameters`` are the two sides of that contract.
- ``input/data/dataset/``: the dataset channel, kohya's layout (``<repeats>_<name>/<image>`` + ``.txt``);
- ``input/data/model/``: the model channel, one base model file.

It writes the run file and runs the trainer as the local backend's runner does (``deploy.trainer_process``):
``output_dir`` is ``model/`` (the final LoRA and each saved epoch; SageMaker uploads the folder as
``{S3OutputPath}/{job}/output/model.tar.gz`` — it holds only ``*.safetensors``), ``state_dir`` is
``checkpoints/`` (SageMaker syncs it with ``CheckpointConfig.S3Uri`` and restores it on a retried or spot job,
so a ``state.pt`` found there at start resumes after its epoch). While it runs:

- ``checkpoints/events.jsonl`` gets the trainer's protocol lines (start, step, saved, sample, done, error) with
  file paths made relative (a LoRA by its file name in ``model/``, a sample or the state relative to
  ``checkpoints/``); step lines at most one per ``STEP_EVENT_SECONDS`` plus the last one before any other event,
  so the file stays small for the studio to poll from S3 (``SageMakerTraining.progress``);
- ``checkpoints/samples/`` gets the sample images, ``checkpoints/train.log`` the trainer's stderr (also echoed to
  our stderr, which SageMaker sends to CloudWatch);
- ``checkpoints/lora/`` gets a copy of each saved epoch's LoRA: a retried job starts on a fresh instance with an
  empty ``model/``, and copies them back there first, so its archive still holds every epoch.

Exit codes: 0 done; 2 bad input and 1 any other failure, both with one tagged paragraph in
``output/failure`` (``deploy.trainer_process.failure_reason``: SageMaker shows it as the job's FailureReason);
3 stopped: SIGTERM (StopTrainingJob, a spot interruption, MaxRuntime) is forwarded to the trainer, which stops at
its next step boundary keeping the epochs saved so far.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deploy.trainer_process import (
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_STOPPED,
    TrainerFailure,
    failure_of,
    failure_reason,
    parse_event,
    pump,
    reap,
    signal_group,
    start_trainer,
    write_run_file,
)
from deploy.training_runner import InvalidPayload, TrainPayload

log = logging.getLogger(__name__)

HYPERPARAMETER_VALUE_MAX = 2500
"""SageMaker's limit on one hyperparameter value (characters)."""
HYPERPARAMETERS_MAX = 100
PAYLOAD_KEY = "payload"
STEP_EVENT_SECONDS = 2.0
MODEL_SUFFIXES = (".safetensors", ".ckpt")
ERROR_TAIL_LINES = 20


# -- the hyperparameters contract --------------------------------------------------------------------------
def payload_hyperparameters(payload: Mapping[str, Any]) -> dict[str, str]:
    """The ``train_lora`` payload as SageMaker hyperparameters: its JSON in ``payload``, continued in
    ``payload_1`` ... when longer than one value may be. ``ValueError`` naming ``payload`` when even that is too
    long (SageMaker takes at most 100 hyperparameters)."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    pieces = [text[i:i + HYPERPARAMETER_VALUE_MAX] for i in range(0, len(text), HYPERPARAMETER_VALUE_MAX)] or [""]
    if len(pieces) > HYPERPARAMETERS_MAX:
        raise ValueError(f"`payload` is {len(text)} characters as JSON; SageMaker hyperparameters hold at most "
                         f"{HYPERPARAMETERS_MAX * HYPERPARAMETER_VALUE_MAX}")
    return {(PAYLOAD_KEY if i == 0 else f"{PAYLOAD_KEY}_{i}"): piece for i, piece in enumerate(pieces)}


def payload_from_hyperparameters(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """The payload ``payload_hyperparameters`` wrote; ``InvalidPayload`` (field ``payload``) for anything else."""
    if not isinstance(values.get(PAYLOAD_KEY), str):
        raise InvalidPayload(f"the hyperparameters need `{PAYLOAD_KEY}` (the train_lora payload as JSON), found "
                             f"{sorted(values)!r}", PAYLOAD_KEY)
    pieces = [values[PAYLOAD_KEY]]
    while isinstance(values.get(f"{PAYLOAD_KEY}_{len(pieces)}"), str):
        pieces.append(values[f"{PAYLOAD_KEY}_{len(pieces)}"])
    try:
        payload = json.loads("".join(pieces))
    except ValueError as exc:
        raise InvalidPayload(f"`{PAYLOAD_KEY}` is not valid JSON: {exc}", PAYLOAD_KEY) from None
    if not isinstance(payload, dict):
        raise InvalidPayload(f"`{PAYLOAD_KEY}` must be a JSON object, not {type(payload).__name__}", PAYLOAD_KEY)
    return payload


# -- the container's folders -------------------------------------------------------------------------------
class MlPaths:
    """The parts of SageMaker's ``/opt/ml`` this command reads and writes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hyperparameters = root / "input" / "config" / "hyperparameters.json"
        self.dataset = root / "input" / "data" / "dataset"
        self.model_channel = root / "input" / "data" / "model"
        self.model = root / "model"
        self.checkpoints = root / "checkpoints"
        self.samples = self.checkpoints / "samples"
        self.saved_epochs = self.checkpoints / "lora"
        self.events = self.checkpoints / "events.jsonl"
        self.train_log = self.checkpoints / "train.log"
        self.failure = root / "output" / "failure"

    def read_payload(self) -> TrainPayload:
        try:
            values = json.loads(self.hyperparameters.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidPayload(f"no hyperparameters file at {self.hyperparameters}", PAYLOAD_KEY) from None
        except (OSError, ValueError) as exc:
            raise InvalidPayload(f"cannot read {self.hyperparameters.name}: {exc}", PAYLOAD_KEY) from None
        if not isinstance(values, dict):
            raise InvalidPayload(f"{self.hyperparameters.name} must hold an object", PAYLOAD_KEY)
        return TrainPayload.parse(payload_from_hyperparameters(values))

    def base_model(self) -> Path:
        """The one model file of the model channel (SageMaker names it after the S3 object's key)."""
        found = sorted(p for p in self.model_channel.iterdir() if p.is_file()) if self.model_channel.is_dir() else []
        models = [p for p in found if p.suffix.lower() in MODEL_SUFFIXES]
        if len(models) != 1:
            names = ", ".join(p.name for p in found) or "nothing"
            raise InvalidPayload(f"the `model` channel must hold one {' or '.join(MODEL_SUFFIXES)} file; it holds "
                                 f"{names}", "model")
        return models[0]

    def check_dataset(self) -> None:
        if not self.dataset.is_dir() or not any(self.dataset.iterdir()):
            raise InvalidPayload(f"the `dataset` channel at {self.dataset} is empty or missing", "dataset")


# -- the events file ---------------------------------------------------------------------------------------
class EventLog:
    """Appends the trainer's events to ``checkpoints/events.jsonl``, steps rate-limited, paths made relative, and
    moves sample images from ``model/samples/`` into ``checkpoints/samples/`` (``model/`` ships LoRAs only)."""

    def __init__(self, paths: MlPaths) -> None:
        self.paths = paths
        self.last_step_written = 0.0
        self.pending_step: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.done: dict[str, Any] | None = None

    def write(self, event: Mapping[str, Any]) -> None:
        with self.paths.events.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(event, ensure_ascii=False, allow_nan=False, default=str) + "\n")

    def handle(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "step":
            now = time.monotonic()
            if now - self.last_step_written < STEP_EVENT_SECONDS:
                self.pending_step = event
                return
            self.last_step_written, self.pending_step = now, None
            self.write(event)
            return
        self.flush()
        if kind == "saved":
            event = {**event, "lora": self._name_in(event.get("lora"), self.paths.model),
                     "state": self._name_in(event.get("state"), self.paths.checkpoints)}
            self._keep_epoch(event["lora"])
        elif kind == "sample":
            event = {**event, "path": self._move_sample(event.get("path"))}
        elif kind == "done":
            event = {**event, "lora": self._name_in(event.get("lora"), self.paths.model)}
            self.done = event
        elif kind == "error":
            self.error = event
        self.write(event)

    def flush(self) -> None:
        if self.pending_step is not None:
            self.write(self.pending_step)
            self.pending_step, self.last_step_written = None, time.monotonic()

    @staticmethod
    def _name_in(reported: Any, root: Path) -> str | None:
        """``reported`` relative to ``root`` (None when the trainer named no file there)."""
        if not isinstance(reported, str) or not reported:
            return None
        path = Path(reported).resolve()
        return path.relative_to(root.resolve()).as_posix() if path.is_relative_to(root.resolve()) else None

    def _keep_epoch(self, name: str | None) -> None:
        """Copy a saved epoch's LoRA into ``checkpoints/lora/`` (``.partial`` then rename: the sync to S3 never
        takes half a file for a whole one)."""
        source = self.paths.model / name if name else None
        if source is None or source.parent != self.paths.model or not source.is_file():
            return
        self.paths.saved_epochs.mkdir(exist_ok=True)
        partial = self.paths.saved_epochs / f"{source.name}.partial"
        shutil.copyfile(source, partial)
        partial.replace(self.paths.saved_epochs / source.name)

    def restore_epochs(self) -> int:
        """Put the epochs an earlier attempt of this job saved back into ``model/``; how many."""
        restored = 0
        for saved in sorted(self.paths.saved_epochs.glob("*.safetensors")) if self.paths.saved_epochs.is_dir() else []:
            target = self.paths.model / saved.name
            if saved.is_file() and not saved.is_symlink() and not target.exists():
                shutil.copyfile(saved, target)
                restored += 1
        return restored

    def _move_sample(self, reported: Any) -> str | None:
        name = self._name_in(reported, self.paths.model)
        if name is None or not (self.paths.model / name).is_file():
            return None
        target = self.paths.samples / Path(name).name
        shutil.move(self.paths.model / name, target)
        return target.relative_to(self.paths.checkpoints).as_posix()

    def tidy_model_dir(self) -> None:
        """Whatever is left in ``model/`` besides LoRAs (a sample the trainer was writing when stopped, partial
        files) moves out or goes, so the model archive is LoRAs only."""
        for path in sorted(self.paths.model.rglob("*"), reverse=True):
            if path.is_symlink():
                path.unlink()
            elif path.is_file() and path.suffix == ".png":
                shutil.move(path, self.paths.samples / path.name)
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.parent != self.paths.model or path.suffix != ".safetensors" or path.is_symlink():
                path.unlink(missing_ok=True)


# -- the command -------------------------------------------------------------------------------------------
class TrainCommand:
    """One training job in this container, start to exit code."""

    def __init__(self, paths: MlPaths, *, device: str, skeleton_dirs: Sequence[Path] = (), cpu_threads: int = 0,
                 command: Sequence[str] | None = None) -> None:
        self.paths = paths
        self.device = device
        self.skeleton_dirs = tuple(skeleton_dirs)
        self.cpu_threads = cpu_threads
        self.command = list(command) if command else [sys.executable, "-m", "training"]
        self.events = EventLog(paths)
        self.tail: list[str] = []
        self.tail_lock = threading.Lock()
        self.terminated = threading.Event()
        self.process: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        for folder in (self.paths.model, self.paths.checkpoints, self.paths.samples, self.paths.failure.parent):
            folder.mkdir(parents=True, exist_ok=True)
        try:
            payload = self.paths.read_payload()
            base_model = self.paths.base_model()
            self.paths.check_dataset()
        except InvalidPayload as exc:
            return self._fail(TrainerFailure("bad_request", str(exc), exc.field), EXIT_INVALID)
        resumed = (self.paths.checkpoints / "state.pt").is_file()
        restored = self.events.restore_epochs()
        self._log(f"[studio] training {payload.output_name!r} ({payload.base_type}) on {self.device} from "
                  f"{base_model.name}" + (", resuming from checkpoints/state.pt" if resumed else "")
                  + (f" ({restored} saved epochs restored to model/)" if restored else ""))
        with tempfile.TemporaryDirectory(prefix="studio-train-") as work:
            run_file = write_run_file(Path(work) / "run.json", base_type=payload.base_type, config=payload.config,
                                      output_name=payload.output_name, base_model=base_model,
                                      dataset_dir=self.paths.dataset, output_dir=self.paths.model,
                                      state_dir=self.paths.checkpoints, device=self.device,
                                      skeleton_dirs=self.skeleton_dirs, cpu_threads=self.cpu_threads)
            try:
                code = self._supervise(run_file)
            finally:
                self.events.flush()
                self.events.tidy_model_dir()
        self._log(f"[studio] trainer exited with code {code}")
        if code == EXIT_DONE and self.events.done is not None and self.events.done.get("lora"):
            return EXIT_DONE
        if code == EXIT_STOPPED and self.terminated.is_set():
            return EXIT_STOPPED  # SageMaker asked: the job ends Stopped, with the epochs saved so far in model/
        if code == EXIT_STOPPED:
            failure = TrainerFailure("interrupted", "the trainer was stopped from inside the container")
        else:
            with self.tail_lock:
                tail = "\n".join(self.tail)
            failure = failure_of(code, self.events.error, tail)
        return self._fail(failure, EXIT_INVALID if failure.kind == "bad_request" else EXIT_FAILED)

    def terminate(self, *_args: Any) -> None:
        """SIGTERM from SageMaker: pass it on; the trainer stops at its next step boundary."""
        self.terminated.set()
        if self.process is not None:
            signal_group(self.process, signal.SIGTERM)

    def _supervise(self, run_file: Path) -> int:
        if self.terminated.is_set():  # SIGTERM arrived while the inputs were being checked
            return EXIT_STOPPED
        try:
            self.process = start_trainer(self.command, run_file, run_file.parent)
        except OSError as exc:
            self.events.error = {"event": "error", "message": f"cannot start the trainer: {exc}", "field": None}
            return EXIT_FAILED
        if self.terminated.is_set():  # SIGTERM arrived while it was starting
            signal_group(self.process, signal.SIGTERM)
        stdout, stderr = self.process.stdout, self.process.stderr
        assert stdout is not None and stderr is not None
        reader = threading.Thread(target=pump, args=(stderr, self._log), daemon=True)
        reader.start()
        try:
            pump(stdout, self._on_line)
            self.process.wait()
        finally:
            code = reap(self.process)
            reader.join(timeout=5)
        return code

    def _on_line(self, line: str) -> None:
        event = parse_event(line)
        if event is None:
            self._log(line)
        else:
            self.events.handle(event)

    def _log(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        with self.tail_lock:
            self.tail.append(line)
            del self.tail[:-ERROR_TAIL_LINES]
            with self.paths.train_log.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    def _fail(self, failure: TrainerFailure, code: int) -> int:
        """Write the reason SageMaker shows (and an error line for the studio's progress reader)."""
        if self.events.error is None:
            self.events.write({"event": "error", "message": failure.message, "field": failure.field})
        reason = failure_reason(failure)
        self.paths.failure.write_text(reason + "\n", encoding="utf-8")
        self._log(f"[studio] failed: {reason}")
        return code


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch  # only to see the GPU; the trainer itself runs in its own process

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_train(*, ml_root: Path, device: str = "auto", skeleton_dirs: Sequence[Path] = (), cpu_threads: int = 0) -> int:
    """The ``train`` command: run the job, SIGTERM forwarded to the trainer while it runs."""
    command = TrainCommand(MlPaths(ml_root), device=resolve_device(device), skeleton_dirs=skeleton_dirs,
                           cpu_threads=cpu_threads)
    previous = signal.signal(signal.SIGTERM, command.terminate)
    try:
        return command.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
