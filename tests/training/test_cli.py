"""`python -m training`: the JSON-lines protocol, exit codes, and stopping by signal."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tests.training.conftest import run_spec, tiny_config, write_dataset
from training.__main__ import main
from training.runfile import write_run_file

ROOT = Path(__file__).resolve().parents[2]


def _run_file(tiny: Any, tmp_path: Path, config: dict[str, Any], *, dataset: Path | None = None,
              base: str = "sd15") -> Path:
    dataset = dataset or write_dataset(tmp_path / "dataset")
    spec = run_spec(tiny, tmp_path, dataset, base, cpu_threads=1)
    return write_run_file(tmp_path / "run.toml", spec, config)


def _main(run_file: Path) -> tuple[int, list[dict[str, Any]]]:
    out = io.StringIO()
    code = main(["--config", str(run_file)], stdout=out)
    return code, [json.loads(line) for line in out.getvalue().splitlines()]


def test_bad_config_exits_2_naming_the_field(tiny: Any, tmp_path: Path) -> None:
    code, events = _main(_run_file(tiny, tmp_path, tiny_config(network_dim=0, xformers=True)))
    assert code == 2
    assert events == [{"event": "error", "message": events[0]["message"], "field": "network_dim"}]
    assert "network_dim" in events[0]["message"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()


def test_bad_run_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[run]\nbase_model = "relative.safetensors"\nbase_type = "sd2"\n')
    code, events = _main(path)
    assert code == 2 and events[0]["event"] == "error" and events[0]["field"] == "run.base_model"
    assert "run.base_type" in events[0]["message"] and "run.output_dir" in events[0]["message"]


def test_bad_dataset_exits_2_naming_the_folder(tiny: Any, tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    (dataset / "dogs").mkdir(parents=True)
    code, events = _main(_run_file(tiny, tmp_path, tiny_config(), dataset=dataset))
    assert code == 2
    assert events[-1]["event"] == "error" and events[-1]["field"] == "train_data_dir"
    assert "dogs" in events[-1]["message"]
    assert not (tmp_path / "out").exists()


def test_protocol_of_a_run(tiny: Any, tmp_path: Path) -> None:
    code, events = _main(_run_file(tiny, tmp_path, tiny_config(max_train_epochs=2, output_name="shapes")))
    assert code == 0
    kinds = [e["event"] for e in events]
    per_epoch = events[0]["steps_per_epoch"]
    assert kinds == ["start"] + ["step"] * per_epoch + ["saved"] + ["step"] * per_epoch + ["done"]
    step = events[1]
    assert set(step) == {"event", "step", "total", "epoch", "loss", "loss_avg", "lr"}
    assert step["step"] == 1 and step["total"] == 2 * per_epoch and step["epoch"] == 1 and step["lr"] == 1e-2
    saved = events[per_epoch + 1]
    assert saved == {"event": "saved", "epoch": 1, "step": per_epoch,
                     "lora": str(tmp_path / "out" / "shapes-000001.safetensors"),
                     "state": str(tmp_path / "state" / "state.pt")}
    assert events[-1] == {"event": "done", "lora": str(tmp_path / "out" / "shapes.safetensors"),
                          "step": 2 * per_epoch, "epoch": 2}


def test_sigterm_stops_keeping_the_last_epoch_then_resumes(tiny: Any, tmp_path: Path) -> None:
    run_file = _run_file(tiny, tmp_path, tiny_config(max_train_epochs=40))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "training", "--config", str(run_file)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(json.loads(line))
        if lines[-1]["event"] == "saved":
            proc.send_signal(signal.SIGTERM)
            break
    lines += [json.loads(line) for line in proc.stdout]
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 3, stderr
    assert "SIGTERM" in stderr
    assert lines[0]["event"] == "start" and all(e["event"] in ("step", "saved") for e in lines[1:])
    last = [e for e in lines if e["event"] == "saved"][-1]
    assert last["epoch"] < 40
    state = torch.load(last["state"], weights_only=True)
    assert (state["epoch"], state["step"]) == (last["epoch"], last["step"])
    assert load_file(last["lora"])  # the epoch LoRA is whole
    assert not list(tmp_path.rglob("*.partial"))
    assert not (tmp_path / "out" / f"lora-{last['epoch'] + 1:06d}.safetensors").exists()

    code, events = _main(run_file)
    assert code == 0
    assert events[0]["resumed_epoch"] == last["epoch"]
    assert events[1]["step"] == last["step"] + 1
    assert events[-1]["event"] == "done" and events[-1]["epoch"] == 40


def test_a_trainer_whose_parent_is_gone_stops() -> None:
    """The studio killed with SIGKILL cannot send SIGTERM: the trainer notices its parent changed and stops."""
    import threading

    from training.__main__ import _watch_parent

    stop = threading.Event()
    _watch_parent(os.getppid() + 100000, stop, every=0.01)  # not our parent: returns once it has set stop
    assert stop.is_set()
    kept = threading.Event()
    watcher = threading.Thread(target=_watch_parent, args=(os.getppid(), kept, 0.01), daemon=True)
    watcher.start()
    watcher.join(0.2)
    assert watcher.is_alive() and not kept.is_set()  # the real parent is alive: no stop
    kept.set()
