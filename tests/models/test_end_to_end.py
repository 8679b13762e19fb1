"""The three ways in, end to end, on the local store and on S3 (moto): each model lands Active, its
blob verifies, and a worker's ModelFiles materialises exactly the registered bytes."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from deploy.model_files import ModelFiles
from tests.conftest import ADMIN_PASSWORD, login
from tests.models.conftest import admin_of, wait_task
from tests.models.http_files import serve_files


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")  # starts moto and points AWS_ENDPOINT_URL at it
    return f"s3://{bucket}/studio"


def test_three_ways_in(build_studio, tiny, import_root, store_url, tmp_path):
    from fastapi.testclient import TestClient

    with serve_files({"tinyvae.safetensors": tiny.vae}) as web:
        studio = build_studio(store=store_url, url_import_allow=[f"127.0.0.1:{web.port}"])
        admin = admin_of(studio)
        # 1. from the server (copied into the store)
        server_file = shutil.copy(tiny.lora, import_root / "style.safetensors")
        task = studio.model_services.server.start(actor=admin, paths=[str(server_file)], in_place=False)
        assert wait_task(studio, task.id).status.value == "succeeded"
        # 2. from the browser, in chunks
        data = tiny.checkpoint.read_bytes()
        with TestClient(studio.app, follow_redirects=False) as client:
            login(client, "admin", ADMIN_PASSWORD)
            upload = client.post("/api/v1/uploads", json={"file_name": "tiny-sd15.safetensors", "size": len(data),
                                                          "type": "checkpoint"}).json()
            step = max(1, len(data) // 3)
            for start in range(0, len(data), step):
                piece = data[start:start + step]
                assert client.put(f"/api/v1/uploads/{upload['id']}?offset={start}", content=piece).status_code == 200
            task_id = client.post(f"/api/v1/uploads/{upload['id']}/complete").json()["id"]
            assert wait_task(studio, task_id).status.value == "succeeded"
            # 3. from a URL
            answer = client.post("/api/v1/models/import/url", json={
                "urls": f"{web.base}/files/tinyvae.safetensors", "type": "vae"})
            assert answer.status_code == 202
            assert wait_task(studio, answer.json()["id"]).status.value == "succeeded"
            listed = client.get("/api/v1/models").json()["items"]
    assert sorted((m["type"], m["name"], m["status"]) for m in listed) == [
        ("checkpoint", "tiny-sd15", "Active"), ("lora", "style", "Active"), ("vae", "tinyvae", "Active")]
    files = ModelFiles(studio.store, tmp_path / "worker-cache", budget_bytes=10**9)
    for source, model_type, name in ((tiny.lora, "lora", "style"), (tiny.checkpoint, "checkpoint", "tiny-sd15"),
                                     (tiny.vae, "vae", "tinyvae")):
        record = studio.models.find(actor=admin, type=model_type, ref=name)
        assert record.store_key is not None and record.local_path is None
        assert record.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
        assert studio.store.stat(record.store_key).size == record.size
        assert files.path_for(studio.models.file_ref(record)).read_bytes() == source.read_bytes()
