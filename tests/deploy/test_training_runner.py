"""The ``train_lora`` runner around a fake trainer: events, store keys, cancel, stop and resume, bad input.

The fake (written into tmp_path and started through the ``training_command`` option) speaks the trainer's
stdout protocol over the run file the runner wrote: it checks the dataset copy and the base model exist, writes
real small files, resumes after the epoch in ``state.pt``, stops at a step boundary with exit code 3 on SIGTERM
and refuses a bad config with an error line and exit code 2. The real trainer is not needed here.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.backends.messages import Cancelled, Failed, JobModels, JobSpec, ModelSpec, Progress, Succeeded
from deploy.jobkinds import TRAIN_LORA, RunnerContext, build_runner
from deploy.model_files import ModelFileRef, ModelFiles
from deploy.storage import LocalStore, StoredBlob
from deploy.training_runner import TrainingRunner

FAKE_TRAINER = r'''
import json, os, signal, sys, time
from pathlib import Path

args = sys.argv[1:]
run_file = json.loads(Path(args[args.index("--config") + 1]).read_text())
run, config = run_file["run"], run_file["config"]
stop = []
signal.signal(signal.SIGTERM, signal.SIG_IGN if config.get("ignore_term") else lambda *_: stop.append(True))
if config.get("pid_file"):
    Path(config["pid_file"]).write_text(str(os.getpid()))

def say(**event):
    print(json.dumps(event), flush=True)

if config.get("network_dim", 1) <= 0:
    say(event="error", message="`network_dim` must be at least 1, not 0", field="network_dim")
    sys.exit(2)
if config.get("crash"):
    print("Traceback: something broke inside", file=sys.stderr)
    sys.exit(1)
data = Path(run["train_data_dir"])
images = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
assert images and all(p.split("/")[0] == "2_cat" for p in images), images
assert Path(run["base_model"]).is_file() and run["base_type"] == "sd15" and run["device"] == "cpu"
out, state_dir = Path(run["output_dir"]), Path(run["state_dir"])
state = state_dir / "state.pt"
resumed = json.loads(state.read_text())["epoch"] if state.exists() else 0
print(f"state {state} exists={state.exists()} resuming after epoch {resumed}", file=sys.stderr, flush=True)
epochs, per_epoch, name = config["max_train_epochs"], config["steps_per_epoch"], config["output_name"]
total = epochs * per_epoch
say(event="start", total_steps=total, epochs=epochs, steps_per_epoch=per_epoch, resumed_epoch=resumed,
    images=len(images))
step = resumed * per_epoch
for epoch in range(resumed + 1, epochs + 1):
    for _ in range(per_epoch):
        if stop:
            print("stopped by SIGTERM", file=sys.stderr, flush=True)
            sys.exit(3)
        time.sleep(config.get("step_delay", 0))
        step += 1
        print(f"step {step}", file=sys.stderr, flush=True)
        say(event="step", step=step, total=total, epoch=epoch, loss=0.5 / step, loss_avg=0.4, lr=1e-4)
    if epoch < epochs:  # as kohya: the last epoch is the final LoRA
        lora = out / f"{name}-{epoch:06d}.safetensors"
        lora.write_bytes(b"lora epoch %d" % epoch)
        partial = state.with_suffix(".pt.partial")
        partial.write_text(json.dumps({"epoch": epoch}))
        partial.replace(state)
        say(event="saved", epoch=epoch, step=step, lora=str(lora), state=str(state))
    (out / "samples").mkdir(exist_ok=True)
    sample = out / "samples" / f"{name}-e{epoch:06d}-00.png"
    sample.write_bytes(b"\x89PNG fake")
    say(event="sample", epoch=epoch, path=str(sample), prompt="a cat")
final = out / f"{name}.safetensors"
final.write_bytes(b"final lora")
say(event="done", lora=str(final), step=step, epoch=epochs)
'''

BASE_KEY = "models/checkpoint/base.safetensors"
PREFIX = "datasets/d1/"


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    store = LocalStore(tmp_path / "store")
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"not really a checkpoint")
    store.put_file(BASE_KEY, base)
    for name in ("a", "b"):
        (tmp_path / f"{name}.png").write_bytes(b"\x89PNG " + name.encode())
        store.put_file(f"{PREFIX}2_cat/{name}.png", tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a photo of {name}")
        store.put_file(f"{PREFIX}2_cat/{name}.txt", tmp_path / f"{name}.txt")
    sha = hashlib.sha256(base.read_bytes()).hexdigest()
    ref = ModelFileRef(sha256=sha, store_key=BASE_KEY, local_path=None, size=base.stat().st_size)
    models = JobModels(checkpoint=ModelSpec(kind="checkpoint", name="base", sha256=sha, file=ref))
    return {"tmp": tmp_path, "store": store, "models": models, "command": [sys.executable, str(script)],
            "work": tmp_path / "work", "cache": tmp_path / "cache", "pid_file": tmp_path / "trainer.pid"}


def _spec(setup: dict[str, Any], job_id: str = "job1", **config: Any) -> JobSpec:
    values = {"max_train_epochs": 2, "steps_per_epoch": 3, "network_dim": 4, "pid_file": str(setup["pid_file"]),
              **config}
    payload = {"base_type": "sd15", "config": values, "dataset_id": "d1", "dataset_prefix": PREFIX,
               "output_name": "mylora", "base_model_name": "base"}
    return JobSpec(job_id=job_id, mode="train", request=None, models=setup["models"], kind=TRAIN_LORA,
                   payload=payload)


def _runner(setup: dict[str, Any], store: Any = None, grace: float = 10, command: Any = None) -> TrainingRunner:
    files = ModelFiles(store or setup["store"], setup["cache"], 1 << 30)
    setup["work"].mkdir(exist_ok=True)
    context = RunnerContext(device="cpu", model_files=files, work_dir=setup["work"],
                            options={"training_command": command or setup["command"], "training_stop_grace": grace})
    runner = build_runner(TRAIN_LORA, context)
    assert isinstance(runner, TrainingRunner)
    return runner


def _keys(store: LocalStore, prefix: str = "jobs/") -> list[str]:
    return [blob.key for blob in store.list(prefix)]


def _assert_gone(setup: dict[str, Any]) -> None:
    """No trainer process left and nothing left on the worker's disk."""
    pid = int(setup["pid_file"].read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert list(setup["work"].iterdir()) == []


def test_a_run_uploads_epochs_samples_state_final_lora_and_log(setup):
    events: list[Any] = []
    runner = _runner(setup)
    result = runner.run(_spec(setup), emit=events.append, should_cancel=lambda: False, stopping=lambda: False)

    assert isinstance(result, Succeeded), result
    lora = ["jobs/job1/lora/mylora-000001.safetensors"]
    samples = ["jobs/job1/samples/mylora-e000001-00.png", "jobs/job1/samples/mylora-e000002-00.png"]
    final = "jobs/job1/lora/mylora.safetensors"
    assert sorted(result.artifact_keys) == sorted([*lora, *samples, final, "jobs/job1/train.log"])
    assert result.info == {"lora": final, "epochs": 2, "steps": 6}
    assert not result.images and not result.image_keys
    store = setup["store"]
    assert sorted(_keys(store)) == sorted(result.artifact_keys)  # the resume state is dropped once done
    assert store.open(final).read() == b"final lora"
    log_text = store.open("jobs/job1/train.log").read().decode()
    assert "step 6" in log_text and "exists=False" in log_text and "exited with code 0" in log_text

    assert all(isinstance(e, Progress) and e.job_id == "job1" for e in events)
    last = events[-1]
    assert (last.step, last.total) == (6, 6) and last.artifact_keys[-1] == final
    saved = [e for e in events if lora[0] in e.artifact_keys]
    assert saved and saved[0].metrics["epoch"] == 1.0 and {"loss", "loss_avg", "lr"} <= set(saved[0].metrics)
    logged = [line for e in events for line in e.log]
    assert any(line.startswith("step ") for line in logged)
    assert runner.release_memory() is False
    _assert_gone(setup)


def _stop_after_first_save(events: list[Any]) -> tuple[Any, threading.Event]:
    flag = threading.Event()

    def emit(event: Any) -> None:
        events.append(event)
        if any(key.endswith("-000001.safetensors") for key in event.artifact_keys):
            flag.set()

    return emit, flag


def test_cancel_keeps_the_uploaded_epochs_and_ends_the_trainer(setup):
    events: list[Any] = []
    emit, flag = _stop_after_first_save(events)
    result = _runner(setup).run(_spec(setup, max_train_epochs=4, step_delay=0.1), emit=emit,
                                should_cancel=flag.is_set, stopping=lambda: False)

    assert isinstance(result, Cancelled), result
    assert "jobs/job1/lora/mylora-000001.safetensors" in result.artifact_keys
    assert "jobs/job1/train.log" in result.artifact_keys
    assert "jobs/job1/lora/mylora.safetensors" not in _keys(setup["store"])
    assert set(result.artifact_keys) <= set(_keys(setup["store"]))
    assert "stopped by SIGTERM" in setup["store"].open("jobs/job1/train.log").read().decode()
    _assert_gone(setup)


def test_a_stopping_backend_interrupts_and_the_retry_resumes_from_the_saved_state(setup):
    events: list[Any] = []
    emit, flag = _stop_after_first_save(events)
    spec = _spec(setup, max_train_epochs=3, step_delay=0.1)
    first = _runner(setup).run(spec, emit=emit, should_cancel=flag.is_set, stopping=flag.is_set)

    assert isinstance(first, Failed) and first.kind == "interrupted", first
    assert setup["store"].exists("jobs/job1/state/state.pt")
    _assert_gone(setup)

    again: list[Any] = []
    second = _runner(setup).run(spec, emit=again.append, should_cancel=lambda: False, stopping=lambda: False)

    assert isinstance(second, Succeeded), second
    assert again[0].metrics["epoch"] >= 1.0 and again[0].step >= 3  # the start event: resumed after epoch 1+
    logged = "\n".join(line for e in again for line in e.log)
    assert "exists=True resuming after epoch" in logged and "resuming after epoch 0" not in logged
    # the epochs of both attempts are the job's artifacts, and the log holds both attempts
    assert {f"jobs/job1/lora/mylora-00000{e}.safetensors" for e in (1, 2)} <= set(second.artifact_keys)
    assert "jobs/job1/lora/mylora.safetensors" in second.artifact_keys
    log_text = setup["store"].open("jobs/job1/train.log").read().decode()
    assert "exists=False" in log_text and "exists=True" in log_text
    _assert_gone(setup)


def test_step_events_are_rate_limited_but_saves_and_the_end_always_arrive(setup):
    events: list[Any] = []
    result = _runner(setup).run(_spec(setup, max_train_epochs=2, steps_per_epoch=200), emit=events.append,
                                should_cancel=lambda: False, stopping=lambda: False)

    assert isinstance(result, Succeeded), result
    assert len(events) < 30  # 400 steps: start, 2 saves, 2 samples, done, and a few rate-limited steps
    keys = [set(e.artifact_keys) for e in events]
    assert any("jobs/job1/lora/mylora-000001.safetensors" in k for k in keys)
    assert any("jobs/job1/samples/mylora-e000002-00.png" in k for k in keys)
    assert (events[-1].step, events[-1].total) == (400, 400)


def test_a_trainer_ignoring_sigterm_is_killed_after_the_grace_period(setup):
    events: list[Any] = []
    emit, flag = _stop_after_first_save(events)
    result = _runner(setup, grace=1).run(_spec(setup, max_train_epochs=50, step_delay=0.1, ignore_term=True),
                                         emit=emit, should_cancel=flag.is_set, stopping=lambda: False)

    assert isinstance(result, Cancelled), result
    assert "jobs/job1/lora/mylora-000001.safetensors" in result.artifact_keys
    _assert_gone(setup)


def test_a_trainer_command_that_cannot_start_is_an_internal_failure(setup):
    result = _runner(setup, command=[str(setup["tmp"] / "no-such-python")]).run(
        _spec(setup), emit=lambda e: None, should_cancel=lambda: False, stopping=lambda: False)

    assert isinstance(result, Failed) and result.kind == "internal" and "cannot start the trainer" in result.message
    assert list(setup["work"].iterdir()) == []


@pytest.mark.parametrize("stop", [False, True])
def test_a_cancel_before_the_trainer_starts_never_starts_it(setup, stop):
    result = _runner(setup).run(_spec(setup), emit=lambda e: None, should_cancel=lambda: True,
                                stopping=lambda: stop)

    if stop:
        assert isinstance(result, Failed) and result.kind == "interrupted", result
    else:
        assert isinstance(result, Cancelled) and result.artifact_keys == (), result
    assert not setup["pid_file"].exists() and list(setup["work"].iterdir()) == []


def test_exit_2_is_a_bad_request_naming_the_field(setup):
    result = _runner(setup).run(_spec(setup, network_dim=0), emit=lambda e: None, should_cancel=lambda: False,
                                stopping=lambda: False)

    assert isinstance(result, Failed) and result.kind == "bad_request", result
    assert result.field == "network_dim" and "network_dim" in result.message
    _assert_gone(setup)


def test_a_crash_is_internal_with_the_stderr_tail(setup):
    result = _runner(setup).run(_spec(setup, crash=True), emit=lambda e: None, should_cancel=lambda: False,
                                stopping=lambda: False)

    assert isinstance(result, Failed) and result.kind == "internal", result
    assert "exit code 1" in result.message and "something broke inside" in result.message
    _assert_gone(setup)


class _TraversalStore(LocalStore):
    """A store that lists a key climbing out of the dataset (what a broken or hostile store could answer)."""

    def list(self, prefix: str = "") -> Iterator[StoredBlob]:
        yield from super().list(prefix)
        if prefix == PREFIX:
            yield StoredBlob(key=f"{PREFIX}2_cat/../../../escape.png", size=1)


@pytest.mark.parametrize("case", ["prefix", "key", "payload"])
def test_bad_payloads_and_traversal_keys_are_refused_before_the_trainer_starts(setup, case):
    store: Any = None
    spec = _spec(setup)
    if case == "prefix":
        spec = JobSpec(job_id="job1", mode="train", request=None, models=setup["models"], kind=TRAIN_LORA,
                       payload={**spec.payload, "dataset_prefix": "datasets/../models/"})
    elif case == "key":
        store = _TraversalStore(setup["tmp"] / "store")
    else:
        spec = JobSpec(job_id="job1", mode="train", request=None, models=setup["models"], kind=TRAIN_LORA,
                       payload={**spec.payload, "base_type": "sd3"})
    result = _runner(setup, store).run(spec, emit=lambda e: None, should_cancel=lambda: False,
                                       stopping=lambda: False)

    assert isinstance(result, Failed) and result.kind == "bad_request", result
    assert result.field == ("base_type" if case == "payload" else "dataset_prefix")
    assert not setup["pid_file"].exists()  # the trainer never started
    assert not (setup["tmp"] / "escape.png").exists() and not (setup["work"] / "escape.png").exists()
    assert list(setup["work"].iterdir()) == []


def test_the_local_backend_runs_a_training_job_end_to_end(setup):
    from deploy.backends.local import LocalBackend
    from tests.backends.events import Sink

    files = ModelFiles(setup["store"], setup["cache"], 1 << 30)
    backend = LocalBackend("local", model_files=files, devices="cpu", work_dir=setup["work"],
                           training_command=setup["command"])
    assert TRAIN_LORA in backend.capabilities().kinds
    sink = Sink()
    backend.start(sink)
    try:
        backend.submit(_spec(setup, job_id="job7"))
        result = sink.wait_terminal("job7", timeout=60)
    finally:
        backend.stop(10)

    assert isinstance(result, Succeeded), result
    assert result.info["lora"] == "jobs/job7/lora/mylora.safetensors"
    assert set(result.artifact_keys) <= set(_keys(setup["store"], "jobs/job7/"))
    assert sink.of(Progress, "job7")
    assert [p for p in setup["work"].rglob("*") if p.is_file()] == []


def test_training_command_from_the_environment():
    from deploy.backends.local import training_command

    assert training_command({}) is None
    assert training_command({"STUDIO_TRAINING_COMMAND": "/opt/env/bin/python -m training"}) == [
        "/opt/env/bin/python", "-m", "training"]
    assert training_command({"STUDIO_TRAINING_COMMAND": '["/a b/python", "-m", "training"]'}) == [
        "/a b/python", "-m", "training"]
    with pytest.raises(ValueError):
        training_command({"STUDIO_TRAINING_COMMAND": "[1]"})


def test_the_real_trainer_trains_a_tiny_sd15_lora_through_the_runner(tmp_path):
    """``python -m training`` itself: one epoch on two 64 px images, the files in the store are kohya LoRAs."""
    from PIL import Image
    from safetensors import safe_open

    from tests.tiny.fixtures import tiny_files

    tiny = tiny_files()
    checkpoint = tiny.checkpoint("sd15")
    store = LocalStore(tmp_path / "store")
    store.put_file(BASE_KEY, checkpoint)
    for i, colour in enumerate(((220, 30, 30), (30, 30, 220))):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"img{i}.png")
        store.put_file(f"{PREFIX}1_shapes/img{i}.png", tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(["red square", "blue square"][i])
        store.put_file(f"{PREFIX}1_shapes/img{i}.txt", tmp_path / f"img{i}.txt")
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    ref = ModelFileRef(sha256=sha, store_key=BASE_KEY, local_path=None, size=checkpoint.stat().st_size)
    models = JobModels(checkpoint=ModelSpec(kind="checkpoint", name="tiny", sha256=sha, file=ref))
    config = {"resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16,
              "network_dim": 4, "network_alpha": 4, "max_train_epochs": 1, "train_batch_size": 1, "seed": 7,
              "sample_prompts": ["red square --s 2"], "sample_every_n_epochs": 1}
    spec = JobSpec(job_id="real1", mode="train", request=None, models=models, kind=TRAIN_LORA,
                   payload={"base_type": "sd15", "config": config, "dataset_id": "d1", "dataset_prefix": PREFIX,
                            "output_name": "tinylora", "base_model_name": "tiny"})
    work = tmp_path / "work"
    work.mkdir()
    context = RunnerContext(device="cpu", model_files=ModelFiles(store, tmp_path / "cache", 1 << 30), work_dir=work,
                            options={"skeleton_dirs": [str(tiny.skeleton_root)], "cpu_threads": 1})
    events: list[Any] = []
    result = build_runner(TRAIN_LORA, context).run(spec, emit=events.append, should_cancel=lambda: False,
                                                   stopping=lambda: False)

    assert isinstance(result, Succeeded), result
    final = "jobs/real1/lora/tinylora.safetensors"
    assert result.info == {"lora": final, "epochs": 1, "steps": 2}
    assert {final, "jobs/real1/train.log"} <= set(result.artifact_keys)  # one epoch: the final LoRA only
    assert any(key.startswith("jobs/real1/samples/") and key.endswith(".png") for key in result.artifact_keys)
    assert any("loss" in e.metrics for e in events)
    local = tmp_path / "final.safetensors"
    store.download_to(final, local)
    with safe_open(str(local), "pt") as lora:
        names = list(lora.keys())
        assert lora.metadata()["ss_network_dim"] == "4"
    assert any(n.startswith("lora_unet_") and n.endswith(".lora_down.weight") for n in names)
    assert list(work.iterdir()) == []
