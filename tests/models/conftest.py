"""Fixtures for the model registry tests: tiny real-format model files, a studio, users, task waiting.

The files (kohya LoRA, A1111 TI .pt, hypernetwork .pt, VAE, LDM checkpoint .safetensors/.ckpt) are
written once per session from the shared tiny SD1.5 pipeline; each test gets a fresh studio whose
import roots and URL allow-list it can choose.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from tests.conftest import ADMIN_PASSWORD, login  # noqa: E402
from tests.fixtures.moto_server import moto_server, s3_bucket, s3_client  # noqa: E402,F401

USER_PASSWORD = "alice-password-123"


@dataclass(frozen=True)
class TinyFiles:
    checkpoint: Path
    checkpoint_ckpt: Path
    lora: Path
    lora2: Path
    embedding: Path
    hypernetwork: Path
    vae: Path
    controlnet: Path
    inpaint: Path
    root: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    import torch
    from diffusers import ControlNetModel

    from tests.tiny import ldm, networks
    from tests.tiny.fixtures import tiny_files

    torch.set_num_threads(2)
    shared = tiny_files()
    pipe = shared.pipeline("sd15")
    root = tmp_path_factory.mktemp("tiny-models")
    return TinyFiles(
        checkpoint=shutil.copy(shared.checkpoint("sd15"), root / "tiny-sd15.safetensors"),
        checkpoint_ckpt=shutil.copy(shared.checkpoint("sd15", fmt="ckpt"), root / "tiny-sd15-old.ckpt"),
        lora=networks.write_kohya_lora(root / "style.safetensors", pipe),
        lora2=networks.write_kohya_lora(root / "other.safetensors", pipe, seed=3, rank=2),
        embedding=networks.write_textual_inversion(root / "tinyemb.pt", pipe),
        hypernetwork=networks.write_hypernetwork(root / "tinyhyper.pt", pipe),
        vae=networks.write_vae(root / "tinyvae.safetensors"),
        controlnet=ldm.write_controlnet(root / "tinycontrol.safetensors", ControlNetModel.from_unet(pipe.unet)),
        inpaint=shutil.copy(shared.checkpoint("sd15_inpaint"), root / "tiny-inpaint.safetensors"),
        root=root,
    )


@pytest.fixture
def import_root(tmp_path: Path) -> Path:
    root = tmp_path / "server-files"
    root.mkdir()
    return root


@pytest.fixture
def build_studio(make_settings, import_root: Path) -> Iterator[Callable[..., Any]]:
    """Build studios with setting overrides (import root on by default); all closed afterwards."""
    import app

    built: list[Any] = []

    def build(**overrides: Any) -> Any:
        overrides.setdefault("import_roots", [import_root])
        studio = app.build(make_settings(**overrides))
        built.append(studio)
        return studio

    yield build
    for studio in built:
        studio.close()


@pytest.fixture
def mstudio(build_studio):
    return build_studio()


def admin_of(studio: Any) -> Any:
    return studio.users.get_by_name("admin")


def make_user(studio: Any, name: str = "alice") -> Any:
    return studio.users.create_user(actor=admin_of(studio), username=name, password=USER_PASSWORD)


def wait_task(studio: Any, task_id: str, timeout: float = 60) -> Any:
    """The finished task row (fails the test if it does not finish)."""
    tasks = studio.model_services.tasks
    deadline = time.monotonic() + timeout
    task = tasks.wait(task_id, timeout)
    while not task.status.finished and time.monotonic() < deadline:
        time.sleep(0.05)
        task = tasks.wait(task_id, 0.1)
    assert task.status.finished, f"task {task_id} still {task.status}"
    return task


@pytest.fixture
def admin_http(mstudio) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(mstudio.app, follow_redirects=False) as c:
        login(c, "admin", ADMIN_PASSWORD)
        yield c


def user_client(studio: Any, name: str = "alice") -> Any:
    from fastapi.testclient import TestClient

    make_user(studio, name)
    client = TestClient(studio.app, follow_redirects=False)
    login(client, name, USER_PASSWORD)
    return client


def store_keys(studio: Any) -> list[str]:
    return [blob.key for blob in studio.store.list("models/")]


def copy_layout(root: Path, layout: dict[str, Path]) -> Path:
    """Copy each source file to its relative path under `root` (folders made as needed)."""
    for relative, source in layout.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return root
