"""Per-user disk quota on model files: an upload whose declared size would pass the quota is refused at
the start (413 naming ``quota``) and leaves nothing; a user's imported files count once (a file someone
else brings again is not counted for them); open uploads count by their declared size; the importer
refuses a file that no longer fits when it is stored."""

from __future__ import annotations

import pytest
from sqlmodel import select

from tests.models.conftest import store_keys, user_client, wait_task
from tests.models.test_uploads import _upload
from webapp.records import ModelRecord, ModelType, UploadSession
from webapp.services.errors import ServiceError
from webapp.services.models.importer import ImportRequest

ROOM = 1000
"""Bytes of quota left once the LoRA is stored."""


@pytest.fixture
def quota_studio(build_studio, tiny):
    size = tiny.lora.stat().st_size
    return build_studio(user_quota_gb=(size + ROOM + 0.5) / 1024**3)


def _disk(client) -> dict:
    answer = client.get("/api/v1/me/disk")
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_an_upload_that_would_pass_the_quota_is_refused_at_the_start_and_leaves_nothing(quota_studio, tiny):
    alice = user_client(quota_studio, "alice")
    limit = _disk(alice)["limit_bytes"]
    assert limit == tiny.lora.stat().st_size + ROOM
    refused = alice.post("/api/v1/uploads", json={"file_name": "huge.safetensors", "size": limit + 1, "type": "lora"})
    assert refused.status_code == 413 and refused.json()["field"] == "quota", refused.text
    with quota_studio.db.read() as s:
        assert s.exec(select(UploadSession)).all() == [] and s.exec(select(ModelRecord)).all() == []
    assert not any((quota_studio.settings.data_dir / "uploads").iterdir())
    fits = alice.post("/api/v1/uploads", json={"file_name": "x.safetensors", "size": limit, "type": "lora"})
    assert fits.status_code == 201, fits.text
    assert _disk(alice)["used_bytes"] == limit, "an open upload counts by its declared size"


def test_imported_files_count_once_for_their_owner(quota_studio, tiny):
    alice, bob = user_client(quota_studio, "alice"), user_client(quota_studio, "bob")
    data = tiny.lora.read_bytes()
    upload = _upload(alice, data, file_name="style.safetensors", type="lora", chunk=len(data))
    assert wait_task(quota_studio, alice.post(f"/api/v1/uploads/{upload['id']}/complete").json()["id"]).status.value \
        == "succeeded"
    stored = quota_studio.store.stat(store_keys(quota_studio)[0]).size
    assert _disk(alice)["used_bytes"] == stored
    again = _upload(bob, data, file_name="copy.safetensors", type="lora", chunk=len(data))
    assert wait_task(quota_studio, bob.post(f"/api/v1/uploads/{again['id']}/complete").json()["id"]).status.value \
        == "succeeded"
    assert _disk(bob)["used_bytes"] == 0 and _disk(alice)["used_bytes"] == stored, "the same bytes count once"
    over = alice.post("/api/v1/uploads", json={"file_name": "y.safetensors", "size": ROOM + 1, "type": "lora"})
    assert over.status_code == 413 and over.json()["field"] == "quota"

    owner = quota_studio.users.get_by_name("alice")
    importer = quota_studio.models.importer
    with pytest.raises(ServiceError) as refused:  # bigger than the room left: refused when it would be stored
        importer.import_file(tiny.vae, ImportRequest(owner=owner, declared_type=ModelType.VAE, source="url"))
    assert (refused.value.status, refused.value.field) == (413, "quota")
    assert len(store_keys(quota_studio)) == 1, "the refused file was not stored"
