"""From the browser: the chunked upload protocol, resuming after an interrupted chunk, bad requests,
uploads surviving a restart, and the task's progress line."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx

from tests.conftest import ADMIN_PASSWORD
from tests.live import serve
from tests.models.conftest import admin_of, store_keys, user_client, wait_task


def _upload(client, data: bytes, *, file_name: str, type: str, chunk: int, **extra) -> dict:
    created = client.post("/api/v1/uploads", json={"file_name": file_name, "size": len(data), "type": type, **extra})
    assert created.status_code == 201, created.text
    upload = created.json()
    for start in range(0, len(data), chunk):
        piece = data[start:start + chunk]
        answer = client.put(f"/api/v1/uploads/{upload['id']}", content=piece,
                            headers={"content-range": f"bytes {start}-{start + len(piece) - 1}/{len(data)}"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["received"] == start + len(piece)
    return upload


def test_chunked_upload_becomes_an_active_model(mstudio, tiny, admin_http):
    data = tiny.lora.read_bytes()
    upload = _upload(admin_http, data, file_name="style.safetensors", type="lora", chunk=40_000,
                     description='{"description": "ink style", "trigger": "inky"}')
    initial = admin_http.get(f"/api/v1/models/{upload['model_id']}").json()
    assert (initial["status"], initial["name"]) == ("Initial", "style")  # shown while arriving
    task = admin_http.post(f"/api/v1/uploads/{upload['id']}/complete")
    assert task.status_code == 202
    done = wait_task(mstudio, task.json()["id"])
    assert done.status.value == "succeeded"
    line = admin_http.get(f"/api/v1/tasks/{done.id}").json()["items"][0]
    assert line["state"] == "done" and line["model_name"] == "style"
    model = admin_http.get(f"/api/v1/models/{upload['model_id']}").json()
    assert (model["status"], model["type"], model["base"], model["description"]) == ("Active", "lora", "sd1", "ink style")
    assert model["metadata"]["trigger"] == "inky"
    import hashlib

    assert model["sha256"] == hashlib.sha256(data).hexdigest()
    assert admin_http.get(f"/api/v1/uploads/{upload['id']}").json()["status"] == "done"
    assert not (mstudio.settings.data_dir / "uploads" / upload["id"]).exists()  # staged bytes removed
    # the same bytes again: deduplicated, the second reserved row vanishes
    again = _upload(admin_http, data, file_name="copy.safetensors", type="lora", chunk=len(data))
    second = wait_task(mstudio, admin_http.post(f"/api/v1/uploads/{again['id']}/complete").json()["id"])
    assert json.loads(second.items_json)[0]["state"] == "known"
    listed = admin_http.get("/api/v1/models", params={"status": "all"}).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == upload["model_id"]
    assert len(store_keys(mstudio)) == 1


def test_declared_type_mismatch_fails_the_upload_and_leaves_nothing(mstudio, tiny, admin_http):
    upload = _upload(admin_http, tiny.vae.read_bytes(), file_name="x.safetensors", type="lora", chunk=10**6)
    done = wait_task(mstudio, admin_http.post(f"/api/v1/uploads/{upload['id']}/complete").json()["id"])
    item = json.loads(done.items_json)[0]
    assert done.status.value == "failed" and "a VAE" in item["message"] and "a LoRA" in item["message"]
    assert admin_http.get("/api/v1/models", params={"status": "all"}).json()["total"] == 0
    assert store_keys(mstudio) == []


def test_protocol_errors_name_the_field(mstudio, tiny, admin_http):
    bad = admin_http.post("/api/v1/uploads", json={"file_name": "x.safetensors", "size": 10, "type": "nonsense"})
    assert bad.status_code == 422
    too_big = admin_http.post("/api/v1/uploads", json={"file_name": "x.safetensors", "size": 10**15, "type": "lora"})
    assert too_big.status_code == 422 and too_big.json()["field"] == "size"
    upload = admin_http.post("/api/v1/uploads", json={"file_name": "x.safetensors", "size": 10, "type": "lora"}).json()
    wrong = admin_http.put(f"/api/v1/uploads/{upload['id']}", content=b"abc", headers={"content-range": "bytes 5-7/10"})
    assert wrong.status_code == 409 and wrong.json()["field"] == "offset" and "offset 0" in wrong.json()["detail"]
    over = admin_http.put(f"/api/v1/uploads/{upload['id']}?offset=0", content=b"x" * 11)
    assert over.status_code == 422 and over.json()["field"] == "size"
    early = admin_http.post(f"/api/v1/uploads/{upload['id']}/complete")
    assert early.status_code == 409
    other = user_client(mstudio)
    assert other.get(f"/api/v1/uploads/{upload['id']}").status_code == 404  # someone else's upload
    assert admin_http.delete(f"/api/v1/uploads/{upload['id']}").status_code == 204
    assert admin_http.get("/api/v1/models", params={"status": "all"}).json()["total"] == 0
    assert not (mstudio.settings.data_dir / "uploads" / upload["id"]).exists()


def _raw_put_then_drop(base: str, cookie: str, upload_id: str, data: bytes, sent: int) -> None:
    """Announce all of `data` but send only `sent` bytes, then close the connection (a dropped chunk)."""
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        head = (f"PUT /api/v1/uploads/{upload_id} HTTP/1.1\r\nHost: {parts.netloc}\r\nCookie: {cookie}\r\n"
                f"Content-Range: bytes 0-{len(data) - 1}/{len(data)}\r\nContent-Length: {len(data)}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n")
        sock.sendall(head.encode() + data[:sent])
        time.sleep(1.0)  # let the server read what was sent; uvicorn drops unread bytes on a disconnect


def test_resume_after_an_interrupted_chunk_on_a_real_server(mstudio, tiny):
    data = tiny.lora.read_bytes()
    with serve(mstudio.app) as base, httpx.Client(base_url=base) as client:
        client.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD})
        upload = client.post("/api/v1/uploads", json={"file_name": "style.safetensors", "size": len(data),
                                                      "type": "lora"}).json()
        cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
        _raw_put_then_drop(base, cookie, upload["id"], data, sent=50_000)
        deadline = time.monotonic() + 20
        while (status := client.get(f"/api/v1/uploads/{upload['id']}")).json()["received"] == 0:
            assert time.monotonic() < deadline, "the server never counted the dropped chunk's bytes"
            time.sleep(0.05)
        offset = int(status.headers["upload-offset"])
        assert 0 < offset <= 50_000 and status.json()["status"] == "open"
        rest = client.put(f"/api/v1/uploads/{upload['id']}", content=data[offset:],
                          headers={"content-range": f"bytes {offset}-{len(data) - 1}/{len(data)}"})
        assert rest.status_code == 200 and rest.json()["received"] == len(data)
        task = client.post(f"/api/v1/uploads/{upload['id']}/complete").json()
        assert wait_task(mstudio, task["id"]).status.value == "succeeded"
        model = client.get(f"/api/v1/models/{upload['model_id']}").json()
    import hashlib

    assert model["status"] == "Active" and model["sha256"] == hashlib.sha256(data).hexdigest()


def test_upload_survives_a_restart_and_resumes(build_studio, tiny, data_dir):
    from fastapi.testclient import TestClient

    from tests.conftest import login

    data = tiny.lora.read_bytes()
    first = build_studio()
    with TestClient(first.app, follow_redirects=False) as client:
        login(client, "admin", ADMIN_PASSWORD)
        upload = client.post("/api/v1/uploads", json={"file_name": "style.safetensors", "size": len(data),
                                                      "type": "lora"}).json()
        client.put(f"/api/v1/uploads/{upload['id']}?offset=0", content=data[:30_000])
    first.close()
    second = build_studio()
    with TestClient(second.app, follow_redirects=False) as client:
        login(client, "admin", ADMIN_PASSWORD)
        assert client.get(f"/api/v1/uploads/{upload['id']}").json()["received"] == 30_000
        assert client.get(f"/api/v1/models/{upload['model_id']}").json()["status"] == "Initial"
        client.put(f"/api/v1/uploads/{upload['id']}?offset=30000", content=data[30_000:])
        task = client.post(f"/api/v1/uploads/{upload['id']}/complete").json()
        assert wait_task(second, task["id"]).status.value == "succeeded"
    assert second.models.get(actor=admin_of(second), model_id=upload["model_id"]).status.value == "Active"


def test_abandoned_uploads_expire_with_their_bytes(mstudio, admin_http):
    from datetime import timedelta

    from webapp.records import UploadSession, utcnow

    old = admin_http.post("/api/v1/uploads", json={"file_name": "old.safetensors", "size": 100, "type": "lora"}).json()
    admin_http.put(f"/api/v1/uploads/{old['id']}?offset=0", content=b"x" * 50)
    with mstudio.db.write() as s:
        row = s.get(UploadSession, old["id"])
        row.updated_at = utcnow() - timedelta(days=8)
        s.add(row)
    uploads = mstudio.model_services.uploads
    uploads._last_expiry -= 7200  # the hourly check is due
    fresh = admin_http.post("/api/v1/uploads", json={"file_name": "new.safetensors", "size": 100, "type": "lora"})
    assert fresh.status_code == 201
    assert admin_http.get(f"/api/v1/uploads/{old['id']}").status_code == 404
    assert not (uploads.upload_dir / old["id"]).exists()
    assert admin_http.get(f"/api/v1/models/{old['model_id']}").status_code == 404
