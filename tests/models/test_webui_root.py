"""--models-dir takes an A1111 install as users have it (the webui root or its models/ folder, embeddings in
the root's embeddings/), and a start-up scan lists every name at once, hashing afterwards in the background;
on SQLite and on PostgreSQL (the scan records files' sizes and nanosecond mtimes: 64-bit columns)."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_PASSWORD
from tests.models.conftest import admin_of, copy_layout, wait_task
from webapp.records import ModelStatus
from webapp.settings import Settings
from webapp.ui.generate_form import choices_for

ADMIN = ("admin", ADMIN_PASSWORD)


@pytest.fixture
def make_settings(make_settings, database_url):
    return functools.partial(make_settings, database_url=database_url)


def _webui(root: Path, tiny: Any) -> Path:
    """An A1111 webui folder: models/ with its type folders, embeddings/ beside it (where A1111 keeps them)."""
    layout = {
        "models/Stable-diffusion/sd/tiny-sd15.safetensors": tiny.checkpoint,
        "models/Lora/style.safetensors": tiny.lora,
        "models/VAE/tinyvae.safetensors": tiny.vae,
        "embeddings/tinyemb.pt": tiny.embedding,
    }
    copy_layout(root, layout)
    (root / "webui.py").write_text("# A1111's entry point\n")
    return root


@pytest.fixture
def slow_hashing(monkeypatch) -> threading.Event:
    """Hashing blocks until the returned event is set (the real hash follows), as a big folder would."""
    import pipelines.hashes

    release = threading.Event()
    real = pipelines.hashes.hash_file

    def gated(path: Any, **kwargs: Any) -> Any:
        assert release.wait(60), "the test never released hashing"
        return real(path, **kwargs)

    monkeypatch.setattr(pipelines.hashes, "hash_file", gated)
    yield release
    release.set()  # never leave a worker blocked at teardown


def test_names_are_listed_at_once_and_hashes_follow(build_studio, tiny, tmp_path, slow_hashing):
    root = _webui(tmp_path / "stable-diffusion-webui", tiny)
    studio = build_studio(models_dir=root, import_roots=[])
    admin = admin_of(studio)

    with TestClient(studio.app) as api:  # a client connecting right after start, hashing still running
        models = api.get("/sdapi/v1/sd-models", auth=ADMIN).json()
        assert [(m["model_name"], m["sha256"]) for m in models] == [("sd_tiny-sd15", None)]
        assert models[0]["filename"] == str(root / "models" / "Stable-diffusion" / "sd" / "tiny-sd15.safetensors")
        assert [m["name"] for m in api.get("/sdapi/v1/loras", auth=ADMIN).json()] == ["style"]
        assert [m["model_name"] for m in api.get("/sdapi/v1/sd-vae", auth=ADMIN).json()] == ["tinyvae"]
        items = api.get("/api/v1/models", auth=ADMIN).json()["items"]
        assert {(i["name"], i["status"]) for i in items} == {
            ("sd/tiny-sd15", "Initial"), ("style", "Initial"), ("tinyvae", "Initial"), ("tinyemb", "Initial")}
        # a job naming a model still hashing is refused with the reason, not queued against unknown bytes
        refused = api.post("/sdapi/v1/txt2img", auth=ADMIN, json={
            "prompt": "a fox", "steps": 2, "width": 64, "height": 64,
            "override_settings": {"sd_model_checkpoint": "sd/tiny-sd15"}})
        assert refused.status_code == 422 and "no hash yet" in refused.json()["detail"]
    choices = choices_for(admin, studio.models, [])
    assert choices.checkpoints == ["sd/tiny-sd15"] and "LoRA: style" in choices.networks

    slow_hashing.set()
    scan = studio.model_services.tasks.list_tasks(actor=admin)[0]
    assert wait_task(studio, scan.id).status.value == "succeeded", scan.items_json
    with TestClient(studio.app) as api:
        models = api.get("/sdapi/v1/sd-models", auth=ADMIN).json()
        assert [m["title"] for m in models] == [f"sd/tiny-sd15 [{models[0]['sha256'][:10]}]"]
    records = {r.name: r for r in studio.models.list_models(actor=admin, status=None)}
    assert set(records) == {"sd/tiny-sd15", "style", "tinyvae", "tinyemb"}
    assert all(r.status == ModelStatus.ACTIVE and len(r.sha256) == 64 for r in records.values())
    assert records["tinyemb"].source_detail == str(root / "embeddings" / "tinyemb.pt")  # (a pickle: stored converted)
    assert studio.models.rescan_models_dir().unchanged == 4  # the background pass recorded every file


def test_the_models_folder_of_a_webui_finds_the_roots_embeddings(build_studio, tiny, tmp_path):
    root = _webui(tmp_path / "webui", tiny)
    studio = build_studio(models_dir=root / "models", import_roots=[])
    admin = admin_of(studio)
    scan = studio.model_services.tasks.list_tasks(actor=admin)[0]
    assert wait_task(studio, scan.id).status.value == "succeeded", scan.items_json
    embedding = studio.models.find(actor=admin, type="embedding", ref="tinyemb")
    assert embedding is not None and embedding.source_detail == str(root / "embeddings" / "tinyemb.pt")
    assert studio.models.find(actor=admin, type="checkpoint", ref="sd/tiny-sd15") is not None
    # admins may import from the install's embeddings too (the import roots follow the install)
    assert (root / "embeddings").resolve() in studio.settings.import_roots


def test_import_roots_follow_the_install(tmp_path):
    root = tmp_path / "webui"
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    (root / "embeddings").mkdir()
    for given in (root, root / "models"):
        roots = Settings(data_dir=tmp_path / "data", models_dir=given).import_roots
        for folder in (root / "models", root / "embeddings"):
            assert any(folder.resolve().is_relative_to(r) for r in roots), (given, folder, roots)
