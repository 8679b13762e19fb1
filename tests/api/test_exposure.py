"""What ordinary users may learn about the server: no server paths or database URL, no unbounded rescans,
and no sign that another user's private model holds the bytes they import."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.conftest import ADMIN, ALICE, BOB, ApiStudio, api_studio


def _variant(source: Path, target: Path, tag: str) -> Path:
    """The same tensors under a different safetensors header: new bytes, so a new model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no iterator
        metadata = dict(handle.metadata() or {})
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata={**metadata, "studio_test_variant": tag})
    return target


@pytest.fixture(scope="module")
def exposed(tmp_path_factory) -> Iterator[tuple[ApiStudio, Path]]:
    """A studio whose A1111 models folder holds an in-place checkpoint and LoRA (so they have server paths)."""
    from tests.fixtures.studio_models import tiny_model_file_set

    files = tiny_model_file_set()
    folder = tmp_path_factory.mktemp("exposure") / "a1111-models"
    _variant(files.checkpoint, folder / "Stable-diffusion" / "inplace-ckpt.safetensors", "ckpt")
    _variant(files.lora, folder / "Lora" / "inplace-lora.safetensors", "lora")
    with api_studio(tmp_path_factory, backend="fake", models_dir=folder, refresh_min_interval_seconds=3600) as s:
        s.studio.models.rescan_models_dir()  # the start-up scan, done now (it is no user's refresh)
        yield s, folder


def test_listings_show_server_paths_to_admins_only(exposed):
    s, folder = exposed
    c = s.client
    listings = ["/sdapi/v1/sd-models", "/sdapi/v1/loras", "/sdapi/v1/sd-vae", "/sdapi/v1/hypernetworks",
                "/sdapi/v1/embeddings", "/sdapi/v1/options", "/api/v1/checkpoints", "/api/v1/models"]
    for path in listings:
        answer = c.get(path, auth=ALICE)
        assert answer.status_code == 200, (path, answer.text)
        assert str(folder) not in answer.text, path
    models = {m["model_name"]: m for m in c.get("/sdapi/v1/sd-models", auth=ALICE).json()}
    assert models["inplace-ckpt"]["filename"] == "inplace-ckpt.safetensors"
    assert models["inplace-ckpt"]["title"].startswith("inplace-ckpt")
    loras = {m["name"]: m for m in c.get("/sdapi/v1/loras", auth=ALICE).json()}
    assert loras["inplace-lora"]["path"] == "inplace-lora.safetensors"
    admin_models = {m["model_name"]: m for m in c.get("/sdapi/v1/sd-models", auth=ADMIN).json()}
    assert admin_models["inplace-ckpt"]["filename"] == str(folder / "Stable-diffusion" / "inplace-ckpt.safetensors")
    admin_checkpoints = c.get("/api/v1/checkpoints", auth=ADMIN).text
    assert str(folder) in admin_checkpoints


def test_cmd_flags_show_paths_and_the_database_to_admins_only(exposed):
    s, folder = exposed
    settings = s.studio.settings
    flags = s.client.get("/sdapi/v1/cmd-flags", auth=ALICE)
    assert flags.status_code == 200
    body = flags.json()
    for key in ("data_dir", "models_dir", "database_url", "store"):
        assert body[key] is None, key
    for secret in (str(settings.data_dir), str(folder), "sqlite"):
        assert secret not in flags.text
    assert body["api"] is True and body["port"] == settings.port  # the A1111 shape stays
    admin = s.client.get("/sdapi/v1/cmd-flags", auth=ADMIN).json()
    assert admin["data_dir"] == str(settings.data_dir) and admin["database_url"].startswith("sqlite")
    assert set(admin) == set(body)


def test_a_non_admin_refresh_is_rate_limited_server_wide(exposed):
    s, folder = exposed
    c = s.client

    def checkpoints(auth) -> list[str]:
        return [m["model_name"] for m in c.get("/sdapi/v1/sd-models", auth=auth).json()]

    first = _variant(s.files.checkpoint, folder / "Stable-diffusion" / "first.safetensors", "first")
    answer = c.post("/sdapi/v1/refresh-checkpoints", auth=ALICE)
    assert answer.status_code == 200 and answer.json() is None
    assert "first" in checkpoints(ALICE), "a non-admin refresh rescans when none ran lately"

    _variant(s.files.checkpoint, folder / "Stable-diffusion" / "second.safetensors", "second")
    for path in ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras"):
        answer = c.post(path, auth=BOB)
        assert answer.status_code == 200 and answer.json() is None, "A1111 clients still get their answer"
    assert "second" not in checkpoints(BOB), "another rescan within the interval was skipped"
    studio_refresh = c.post("/api/v1/models/refresh", auth=ALICE)
    assert studio_refresh.status_code == 200 and studio_refresh.json()["rescanned"] is False
    assert str(folder) not in studio_refresh.text

    admin = c.post("/api/v1/models/refresh", auth=ADMIN)
    assert admin.status_code == 200 and admin.json()["rescanned"] is True and admin.json()["added"] == ["second"]
    assert admin.json()["folder"] == str(folder)
    assert "second" in checkpoints(BOB)
    first.unlink()
    (folder / "Stable-diffusion" / "second.safetensors").unlink()
    c.post("/api/v1/models/refresh", auth=ADMIN)


def test_importing_another_users_private_bytes_answers_as_a_fresh_import(exposed, tmp_path):
    s, _folder = exposed
    registry = s.studio.models
    bob, alice = s.user("bob"), s.user("alice")
    private = _variant(s.files.lora, tmp_path / "bobs-secret.safetensors", "bob")
    bobs = registry.register_file(actor=bob, path=private, source="upload", visibility="private")

    (tmp_path / "alice").mkdir()
    copy = shutil.copy(private, tmp_path / "alice" / "bobs-secret.safetensors")  # the same name: the same store key
    alices = registry.register_file(actor=alice, path=copy, source="upload", visibility="private")
    assert alices.id != bobs.id and alices.owner_id == alice.id and alices.store_key == bobs.store_key
    assert registry.get(actor=alice, model_id=alices.id).sha256 == bobs.sha256
    again = registry.register_file(actor=alice, path=copy, source="upload")
    assert again.id == alices.id, "her own model is still deduplicated"

    registry.delete(actor=alice, model_id=alices.id)
    kept = registry.get(actor=bob, model_id=bobs.id)
    assert s.studio.store.exists(kept.store_key), "bob's model keeps its bytes"
    registry.delete(actor=bob, model_id=bobs.id)
    assert not s.studio.store.exists(kept.store_key)
