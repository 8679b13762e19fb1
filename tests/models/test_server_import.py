"""From the server: several paths at once (in place and copied), import roots with '..' and symlink
escapes, admin only, the A1111 models/ folder, --models-dir at start and idempotent rescans."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.models.conftest import admin_of, copy_layout, make_user, store_keys, wait_task
from webapp.records import ModelStatus, ModelType
from webapp.services.errors import InvalidInput, PermissionDenied


def _a1111_folder(root: Path, tiny) -> Path:
    """An A1111 models/ folder: files directly in each type folder and in nested folders."""
    layout = {
        "Stable-diffusion/tiny-sd15.safetensors": tiny.checkpoint,
        "Lora/styles/ink/style.safetensors": tiny.lora,
        "Lora/other.safetensors": tiny.lora2,
        "embeddings/tinyemb.pt": tiny.embedding,
        "hypernetworks/tinyhyper.pt": tiny.hypernetwork,
        "VAE/tinyvae.safetensors": tiny.vae,
    }
    copy_layout(root, layout)
    (root / "Lora" / "other.preview.png").write_bytes(b"not a model")  # A1111 keeps previews beside models
    (root / "ControlNet").mkdir()
    return root


def test_several_paths_in_place_and_copied(mstudio, tiny, import_root):
    admin = admin_of(mstudio)
    lora = shutil.copy(tiny.lora, import_root / "style.safetensors")
    vae = shutil.copy(tiny.vae, import_root / "tinyvae.safetensors")
    ckpt = shutil.copy(tiny.checkpoint_ckpt, import_root / "old.ckpt")
    task = mstudio.model_services.server.start(actor=admin, paths=f"{lora}\n{vae}, {ckpt}", in_place=True)
    done = wait_task(mstudio, task.id)
    assert done.status.value == "succeeded", done.items_json
    by_name = {m.name: m for m in mstudio.models.list_models(actor=admin)}
    assert by_name["style"].local_path == str(Path(lora).resolve()) and by_name["style"].store_key is None
    assert by_name["tinyvae"].local_path is not None
    # a pickle is never used in place: its converted copy goes to the store
    assert by_name["old"].local_path is None and by_name["old"].store_key.endswith(".safetensors")
    items = json.loads(done.items_json)
    assert [i["state"] for i in items] == ["done", "done", "done"]
    assert all(i["done"] == i["total"] for i in items if "total" in i)

    lora2 = shutil.copy(tiny.lora2, import_root / "other.safetensors")
    copied = wait_task(mstudio, mstudio.model_services.server.start(actor=admin, paths=[str(lora2)],
                                                                    in_place=False, declared_type="lora").id)
    assert copied.status.value == "succeeded"
    record = mstudio.models.find(actor=admin, type="lora", ref="other")
    assert record.local_path is None and mstudio.store.exists(record.store_key)


def test_paths_outside_roots_dotdot_and_symlink_escapes_are_refused(mstudio, tiny, import_root, tmp_path):
    admin = admin_of(mstudio)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = shutil.copy(tiny.lora, outside / "secret.safetensors")
    (import_root / "link.safetensors").symlink_to(secret)
    (import_root / "linked-dir").symlink_to(outside, target_is_directory=True)
    inside_link_target = shutil.copy(tiny.vae, import_root / "real-vae.safetensors")
    (import_root / "ok-link.safetensors").symlink_to(inside_link_target)
    for bad in (str(secret), f"{import_root}/../outside/secret.safetensors", str(import_root / "link.safetensors"),
                str(import_root / "linked-dir"), str(import_root / "linked-dir" / "secret.safetensors"),
                "relative/path.safetensors", str(import_root / "missing.safetensors")):
        with pytest.raises(InvalidInput) as caught:
            mstudio.model_services.server.start(actor=admin, paths=[bad])
        assert caught.value.field == "paths", bad
    # a symlink that stays inside the roots is fine
    done = wait_task(mstudio, mstudio.model_services.server.start(
        actor=admin, paths=[str(import_root / "ok-link.safetensors")]).id)
    assert done.status.value == "succeeded"
    assert mstudio.models.count_models(actor=admin) == 1


def test_symlink_swapped_after_the_request_is_refused_when_read(mstudio, tiny, import_root, tmp_path):
    admin = admin_of(mstudio)
    outside = shutil.copy(tiny.lora, tmp_path / "outside.safetensors")
    target = shutil.copy(tiny.lora2, import_root / "model.safetensors")
    services = mstudio.model_services
    services.tasks._pool.submit(lambda: None)  # warm the pool
    gate = __import__("threading").Event()
    original = services.server._run

    def slow_run(ctx):
        gate.wait(10)
        original(ctx)

    from webapp.records import TaskKind

    services.tasks.register(TaskKind.SERVER, slow_run)
    task = services.server.start(actor=admin, paths=[str(target)])
    os.unlink(target)
    os.symlink(outside, target)
    gate.set()
    done = wait_task(mstudio, task.id)
    assert done.status.value == "failed"
    assert "outside the import roots" in json.loads(done.items_json)[0]["message"]
    assert mstudio.models.count_models(actor=admin, status=None) == 0


def test_server_import_is_admin_only(mstudio, tiny, import_root):
    alice = make_user(mstudio)
    path = shutil.copy(tiny.lora, import_root / "style.safetensors")
    with pytest.raises(PermissionDenied):
        mstudio.model_services.server.start(actor=alice, paths=[str(path)])


def test_a1111_folder_import_in_place(mstudio, tiny, import_root):
    admin = admin_of(mstudio)
    folder = _a1111_folder(import_root / "models", tiny)
    done = wait_task(mstudio, mstudio.model_services.server.start(actor=admin, paths=[str(folder)]).id)
    assert done.status.value == "succeeded", done.items_json
    got = {(m.type, m.name) for m in mstudio.models.list_models(actor=admin)}
    assert got == {
        (ModelType.CHECKPOINT, "tiny-sd15"), (ModelType.LORA, "styles/ink/style"), (ModelType.LORA, "other"),
        (ModelType.EMBEDDING, "tinyemb"), (ModelType.HYPERNETWORK, "tinyhyper"), (ModelType.VAE, "tinyvae"),
    }
    ink = mstudio.models.find(actor=admin, type="lora", ref="styles/ink/style.safetensors")
    assert ink.file_name == "styles/ink/style.safetensors" and ink.local_path.endswith("Lora/styles/ink/style.safetensors")
    # only the hypernetwork (engine reads .pt) and the converted embedding differ from in place
    assert mstudio.models.find(actor=admin, type="embedding", ref="tinyemb").local_path is None
    assert len(store_keys(mstudio)) == 1


def test_models_dir_registered_at_start_and_rescanned(build_studio, tiny, tmp_path):
    folder = _a1111_folder(tmp_path / "a1111" / "models", tiny)
    studio = build_studio(models_dir=folder, import_roots=[])  # default roots: data_dir/imports + models dir
    admin = admin_of(studio)
    scan = studio.model_services.tasks.list_tasks(actor=admin)[0]
    assert wait_task(studio, scan.id).status.value == "succeeded"
    assert studio.models.count_models(actor=admin) == 6
    assert folder in studio.settings.import_roots  # the models dir is an import root by default

    again = studio.models.rescan_models_dir()  # idempotent: nothing re-read
    assert (again.added, again.updated, again.vanished, again.unchanged) == ([], [], [], 6)

    shutil.copy(tiny.lora2, folder / "Lora" / "new-one.safetensors")  # same bytes as "other": known already
    (folder / "Lora" / "styles" / "ink" / "style.safetensors").unlink()
    (folder / "Stable-diffusion" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    summary = studio.models.rescan_models_dir()
    assert summary.vanished == ["styles/ink/style"]
    assert str(folder / "Stable-diffusion" / "broken.safetensors") in summary.errors
    gone = studio.models.list_models(actor=admin, status=ModelStatus.FAILED)
    assert [(m.name, "gone from the models folder" in m.failure_reason) for m in gone] == [("styles/ink/style", True)]
    assert studio.models.find(actor=admin, type="lora", ref="styles/ink/style") is None  # not usable

    shutil.copy(tiny.lora, folder / "Lora" / "styles" / "ink" / "style.safetensors")  # it comes back
    back = studio.models.rescan_models_dir()
    assert back.reactivated == ["styles/ink/style"]
    assert studio.models.find(actor=admin, type="lora", ref="styles/ink/style").status == ModelStatus.ACTIVE

    vae = studio.models.find(actor=admin, type="vae", ref="tinyvae")
    studio.models.delete(actor=admin, model_id=vae.id)
    assert (folder / "VAE" / "tinyvae.safetensors").exists()  # the server's file is never deleted
    assert studio.models.rescan_models_dir().added == []  # and a deleted model is not resurrected
    assert studio.models.find(actor=admin, type="vae", ref="tinyvae") is None

    ckpt = folder / "Stable-diffusion" / "tiny-sd15.safetensors"
    before = studio.models.find(actor=admin, type="checkpoint", ref="tiny-sd15")
    shutil.copyfile(tiny.lora2, ckpt)  # changed content of the wrong kind: the model fails to update
    changed = studio.models.rescan_models_dir()
    assert str(ckpt) in changed.errors and "LoRA" in changed.errors[str(ckpt)]
    shutil.copyfile(tiny.checkpoint, ckpt)
    os.utime(ckpt, ns=(1, 1))
    studio.models.rescan_models_dir()
    assert studio.models.find(actor=admin, type="checkpoint", ref="tiny-sd15").id == before.id


def test_refresh_route_rescans(build_studio, tiny, tmp_path):
    from fastapi.testclient import TestClient

    from tests.conftest import ADMIN_PASSWORD, login

    folder = tmp_path / "models"
    (folder / "Lora").mkdir(parents=True)
    studio = build_studio(models_dir=folder)
    with TestClient(studio.app, follow_redirects=False) as client:
        login(client, "admin", ADMIN_PASSWORD)
        shutil.copy(tiny.lora, folder / "Lora" / "fresh.safetensors")
        answer = client.post("/api/v1/models/refresh")
        assert answer.status_code == 200 and answer.json()["added"] == ["fresh"]
        names = [m["name"] for m in client.get("/api/v1/models", params={"type": "lora"}).json()["items"]]
        assert names == ["fresh"]
    # A1111 clients refresh through /sdapi/v1 with their own credentials and see the new files listed.
    (folder / "Stable-diffusion").mkdir()
    shutil.copy(tiny.checkpoint, folder / "Stable-diffusion" / "dropped-in.safetensors")
    shutil.copy(tiny.lora2, folder / "Lora" / "second.safetensors")
    with TestClient(studio.app, follow_redirects=False) as api:
        admin = ("admin", ADMIN_PASSWORD)
        assert "dropped-in" not in [m["model_name"] for m in api.get("/sdapi/v1/sd-models", auth=admin).json()]
        assert api.post("/sdapi/v1/refresh-checkpoints", auth=admin).status_code == 200
        assert "dropped-in" in [m["model_name"] for m in api.get("/sdapi/v1/sd-models", auth=admin).json()]
        assert api.post("/sdapi/v1/refresh-loras", auth=admin).status_code == 200
        assert sorted(m["name"] for m in api.get("/sdapi/v1/loras", auth=admin).json()) == ["fresh", "second"]
