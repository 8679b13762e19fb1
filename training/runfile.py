"""The run file: what the studio decides (model, dataset, folders, device) next to the user's config.

`python -m training --config run.toml` reads it. The `[run]` table is written by the training runner
from the job, never by a user; `[config]` is the kohya-keyed training config (training.config).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import BASE_TYPES, ConfigError, TrainingConfig, parse_config

_RUN_KEYS = ("base_model", "base_type", "train_data_dir", "output_dir", "state_dir", "device", "skeleton_dirs",
             "cpu_threads")


@dataclass(frozen=True)
class RunSpec:
    """Where the run reads and writes, and on what device."""

    base_model: Path
    base_type: str
    train_data_dir: Path
    output_dir: Path
    state_dir: Path
    device: str = "cpu"
    skeleton_dirs: tuple[Path, ...] = ()
    cpu_threads: int = 0


def read_run_file(path: Path) -> tuple[RunSpec, TrainingConfig]:
    """The run and its checked config; ConfigError names the bad key (run keys as `run.<key>`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"cannot read run file {path}: {exc}")]) from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([("", f"run file {path.name} is not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}")]) \
            from None
    if not isinstance(data, dict) or not isinstance(data.get("run"), dict):
        raise ConfigError([("run", "the run file needs a [run] table")])
    extra = sorted(set(data) - {"run", "config"})
    if extra:
        raise ConfigError([(key, "unknown table in the run file (expected [run] and [config])") for key in extra])
    run = parse_run(data["run"])
    raw_config = data.get("config") or {}
    if not isinstance(raw_config, dict):
        raise ConfigError([("config", "must be a table of training settings")])
    return run, parse_config(raw_config, base_type=run.base_type)


def parse_run(raw: Mapping[str, Any]) -> RunSpec:
    problems: list[tuple[str, str]] = []
    for key in raw:
        if key not in _RUN_KEYS:
            problems.append((f"run.{key}", "unknown run key"))
    values: dict[str, Any] = {}
    for key in ("base_model", "train_data_dir", "output_dir", "state_dir"):
        value = raw.get(key)
        if not isinstance(value, str) or not value or not Path(value).is_absolute():
            problems.append((f"run.{key}", f"must be an absolute path, got {value!r}"))
        else:
            values[key] = Path(value)
    base_type = raw.get("base_type")
    if base_type not in BASE_TYPES:
        problems.append(("run.base_type", f"must be one of {', '.join(BASE_TYPES)}, got {base_type!r}"))
    device = raw.get("device", "cpu")
    if not isinstance(device, str) or not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        problems.append(("run.device", f"must be cpu, cuda or cuda:<n>, got {device!r}"))
    skeletons = raw.get("skeleton_dirs", [])
    if not isinstance(skeletons, list) or not all(isinstance(s, str) for s in skeletons):
        problems.append(("run.skeleton_dirs", f"must be a list of folder paths, got {skeletons!r}"))
        skeletons = []
    threads = raw.get("cpu_threads", 0)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        problems.append(("run.cpu_threads", f"must be an integer >= 0, got {threads!r}"))
    if problems:
        raise ConfigError(problems)
    return RunSpec(base_type=base_type, device=device, skeleton_dirs=tuple(Path(s) for s in skeletons),
                   cpu_threads=threads, **values)


def write_run_file(path: Path, run: RunSpec, config: Mapping[str, Any]) -> Path:
    """Write a run file (TOML) for `run` and a kohya-keyed config dict; `.partial` then rename."""
    from training.config import to_toml

    table = {
        "base_model": str(run.base_model), "base_type": run.base_type, "train_data_dir": str(run.train_data_dir),
        "output_dir": str(run.output_dir), "state_dir": str(run.state_dir), "device": run.device,
        "skeleton_dirs": [str(s) for s in run.skeleton_dirs], "cpu_threads": run.cpu_threads,
    }
    text = "[run]\n" + to_toml(table) + "\n[config]\n" + to_toml(dict(config))
    partial = Path(path).with_name(Path(path).name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return Path(path)
