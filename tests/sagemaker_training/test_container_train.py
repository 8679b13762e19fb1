"""``python -m deploy.container train`` as SageMaker runs it, on a temp ``--ml-root`` with the tiny SD1.5 model.

Each test starts the real command (and through it the real trainer) as a subprocess: the hyperparameters file
and the two channels in, a kohya LoRA in ``model/``, events and state in ``checkpoints/``, a reason in
``output/failure`` out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from deploy.container.train import payload_from_hyperparameters, payload_hyperparameters
from deploy.trainer_process import parse_failure_reason
from deploy.training_runner import InvalidPayload
from tests.tiny.fixtures import tiny_files
from tests.training.conftest import tiny_config, write_dataset

ROOT = Path(__file__).resolve().parents[2]


def _ml_root(tmp_path: Path, **config: Any) -> Path:
    """SageMaker's /opt/ml as the training job would find it: hyperparameters and the two channels."""
    root = tmp_path / "ml"
    payload = {"base_type": "sd15", "config": tiny_config(**config), "dataset_id": "d1",
               "dataset_prefix": "datasets/d1/", "output_name": "mylora", "base_model_name": "tiny"}
    write_hyperparameters(root, payload_hyperparameters(payload))
    write_dataset(root / "input" / "data" / "dataset")
    (root / "input" / "data" / "model").mkdir(parents=True)
    shutil.copy(tiny_files().checkpoint("sd15"), root / "input" / "data" / "model" / "tiny.safetensors")
    return root


def write_hyperparameters(root: Path, values: dict[str, Any]) -> None:
    config = root / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(values))


def _start(root: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "deploy.container", "train", "--ml-root", str(root),
                             "--device", "cpu", "--cpu-threads", "1",
                             "--skeleton-dirs", str(tiny_files().skeleton_root)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train(root: Path) -> tuple[int, str]:
    process = _start(root)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def _events(root: Path) -> list[dict[str, Any]]:
    path = root / "checkpoints" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_job_trains_a_kohya_lora_into_model_and_reports_in_checkpoints(tmp_path):
    root = _ml_root(tmp_path, max_train_epochs=2, sample_prompts=["red square --s 2"], sample_every_n_epochs=1)
    code, stderr = _train(root)

    assert code == 0, stderr
    assert sorted(p.name for p in (root / "model").iterdir()) == ["mylora-000001.safetensors", "mylora.safetensors"]
    with safe_open(str(root / "model" / "mylora.safetensors"), "pt") as lora:
        assert lora.metadata()["ss_network_dim"] == "4"
        names = list(lora.keys())
    assert any(n.startswith("lora_unet_") and n.endswith(".lora_down.weight") for n in names)
    events = _events(root)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "step" in kinds
    assert all(isinstance(e["loss"], float) for e in events if e["event"] == "step")
    saved = next(e for e in events if e["event"] == "saved")
    assert (saved["lora"], saved["state"]) == ("mylora-000001.safetensors", "state.pt")
    samples = [e["path"] for e in events if e["event"] == "sample"]
    assert len(samples) == 2 and all((root / "checkpoints" / p).is_file() for p in samples)
    assert all(p.startswith("samples/") and p.endswith(".png") for p in samples)
    assert events[-1]["lora"] == "mylora.safetensors"
    assert (root / "checkpoints" / "state.pt").is_file()
    assert "trainer exited with code 0" in (root / "checkpoints" / "train.log").read_text()
    assert not (root / "output" / "failure").exists()


@pytest.mark.parametrize("case", ["payload", "config", "hyperparameters"])
def test_bad_input_writes_a_failure_naming_the_field_and_exits_2(tmp_path, case):
    root = _ml_root(tmp_path, network_dim=0 if case == "config" else 4)
    if case == "payload":
        payload = payload_from_hyperparameters(json.loads((root / "input/config/hyperparameters.json").read_text()))
        write_hyperparameters(root, payload_hyperparameters({**payload, "base_type": "sd3"}))
    elif case == "hyperparameters":
        write_hyperparameters(root, {"epochs": "3"})
    code, stderr = _train(root)

    field = {"payload": "base_type", "config": "network_dim", "hyperparameters": "payload"}[case]
    assert code == 2, stderr
    reason = (root / "output" / "failure").read_text()
    assert len(reason.strip().splitlines()) == 1 and f"`{field}`" in reason
    failure = parse_failure_reason(f"AlgorithmError: {reason}")
    assert failure is not None and (failure.kind, failure.field) == ("bad_request", field)
    assert _events(root)[-1]["event"] == "error" and _events(root)[-1]["field"] == field
    assert list((root / "model").iterdir()) == []


def test_sigterm_stops_keeping_the_saved_epoch_and_a_retry_resumes_from_checkpoints(tmp_path):
    root = _ml_root(tmp_path, max_train_epochs=40)
    process = _start(root)
    deadline = time.monotonic() + 240
    while not any(e["event"] == "saved" for e in _events(root)):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 3, stderr
    assert "SIGTERM" in stderr  # the trainer got it
    last = [e for e in _events(root) if e["event"] == "saved"][-1]
    assert last["epoch"] < 40 and (root / "model" / last["lora"]).is_file()
    assert not (root / "model" / "mylora.safetensors").exists() and not (root / "output" / "failure").exists()
    assert (root / "checkpoints" / "state.pt").is_file()

    # SageMaker retries the job on a fresh instance: a new model/ folder, the checkpoints restored from S3. (The
    # retry here trains one more epoch instead of the rest of the 40, to stay short: the trainer accepts it.)
    shutil.rmtree(root / "model")
    hyperparameters = root / "input" / "config" / "hyperparameters.json"
    payload = payload_from_hyperparameters(json.loads(hyperparameters.read_text()))
    config = {**payload["config"], "max_train_epochs": last["epoch"] + 1}
    write_hyperparameters(root, payload_hyperparameters({**payload, "config": config}))
    code, stderr = _train(root)

    assert code == 0, stderr
    epochs = [f"mylora-{e:06d}.safetensors" for e in range(1, last["epoch"] + 1)]
    assert sorted(p.name for p in (root / "model").iterdir()) == sorted([*epochs, "mylora.safetensors"])
    assert (root / "model" / last["lora"]).read_bytes() == (root / "checkpoints" / "lora" / last["lora"]).read_bytes()
    starts = [e for e in _events(root) if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_epoch"] == last["epoch"]
    steps = [e for e in _events(root)[_events(root).index(starts[1]):] if e["event"] == "step"]
    assert steps and steps[-1]["step"] == starts[1]["total_steps"] and steps[-1]["epoch"] == last["epoch"] + 1
    assert (root / "model" / "mylora.safetensors").is_file()
    assert "resuming from checkpoints/state.pt" in (root / "checkpoints" / "train.log").read_text()


def test_the_payload_travels_in_hyperparameter_sized_pieces():
    payload = {"base_type": "sd15", "config": {"sample_prompts": ["a cat " * 200] * 5}, "output_name": "x"}
    values = payload_hyperparameters(payload)
    assert len(values) > 1 and all(len(v) <= 2500 and isinstance(v, str) for v in values.values())
    assert payload_from_hyperparameters(values) == payload
    with pytest.raises(InvalidPayload) as refused:
        payload_from_hyperparameters({"payload": "{not json"})
    assert refused.value.field == "payload"
    with pytest.raises(ValueError, match="payload"):
        payload_hyperparameters({"config": {"x": "y" * 300_000}})
