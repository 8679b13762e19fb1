"""The serving image's recipe, checked without docker: its entry runs here, what it copies exists and is in
the build context, its pins cover the project's dependencies."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.container.worker import ROOT

DOCKERFILE = ROOT / "deploy" / "container" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def _one(name: str) -> str:
    values = [rest for word, rest in _instructions() if word == name]
    assert len(values) == 1, f"one {name} expected, found {values}"
    return values[0]


def test_the_entry_is_exec_form_serve_and_runs_in_this_venv():
    entrypoint, cmd = json.loads(_one("ENTRYPOINT")), json.loads(_one("CMD"))
    assert entrypoint == ["python", "-m", "deploy.container"] and cmd == ["serve"]
    result = subprocess.run([sys.executable, *entrypoint[1:], *cmd, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--store", "--cache-dir", "--cache-gb", "--devices", "--annotators-dir", "--skeleton-dirs",
                 "--secret-file", "--max-waiting", "--port", "--host"):
        assert flag in result.stdout
    assert _one("EXPOSE") == "8080" and "/ping" in _one("HEALTHCHECK")
    user = _one("USER")
    assert user and user not in ("root", "0")


def test_every_copied_path_exists_and_is_in_the_build_context():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def in_context(path: str) -> bool:
        included = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            body = pattern[1:] if negate else pattern
            if fnmatch.fnmatch(path, body.rstrip("/")) or path.startswith(body.rstrip("/") + "/"):
                included = negate
        return included

    copies = [rest.split() for word, rest in _instructions() if word == "COPY" and "--from" not in rest]
    assert copies
    for *sources, _target in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert in_context(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
    for kept_out in ("tests", "webapp", "data", ".venv"):
        assert not in_context(kept_out), f"{kept_out} must stay out of the image's build context"
    assert (ROOT / "assets" / "skeletons" / "sd15").is_dir(), "the air-gapped skeletons ship in the image"


def test_the_constraints_pin_every_runtime_dependency_within_its_range():
    pins = {}
    for line in (ROOT / "deploy" / "container" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    for dependency in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (dependency, pins[name])
    assert not {"pytest", "moto", "playwright", "ruff"} & set(pins), "test tools stay out of the image"


def test_the_training_entry_runs_here_and_its_code_is_in_the_image():
    """SageMaker training runs `docker run <image> train`: the same ENTRYPOINT with `train` for CMD."""
    entrypoint = json.loads(_one("ENTRYPOINT"))
    result = subprocess.run([sys.executable, *entrypoint[1:], "train", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--ml-root" in result.stdout
    copied = {rest.split()[0] for word, rest in _instructions() if word == "COPY"}
    assert {"training/", "deploy/", "pipelines/", "assets/"} <= copied  # the trainer runs as `python -m training`
