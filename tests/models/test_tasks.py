"""Import tasks across restarts: interrupted ones fail with the reason and leave nothing behind,
queued ones resume, an interrupted upload import can be completed again."""

from __future__ import annotations

import json
import shutil

from tests.conftest import ADMIN_PASSWORD, login
from tests.models.conftest import admin_of, wait_task
from webapp.records import (
    ImportTask,
    ModelRecord,
    ModelStatus,
    ModelType,
    TaskKind,
    TaskStatus,
    UploadSession,
)


def _insert(studio, **values) -> str:
    task = ImportTask(**values)
    with studio.db.write() as s:
        s.add(task)
    return task.id


def test_restart_fails_running_tasks_cleans_up_and_resumes_queued(build_studio, tiny, import_root):
    first = build_studio()
    admin = admin_of(first)
    reserved = first.model_services.registry.importer.reserve(
        owner=admin, model_type=ModelType.LORA, file_name="half.safetensors", name=None, source="url",
        source_detail=None, visibility="everyone", description=None)
    running = _insert(first, kind=TaskKind.URL, owner_id=admin.id, status=TaskStatus.RUNNING,
                      params_json=json.dumps({"urls": ["https://example.com/x"], "type": "lora"}),
                      items_json=json.dumps([{"source": "https://example.com/x", "state": "downloading",
                                              "reserved_id": reserved.id}]))
    leftover = first.settings.data_dir / "tmp" / "imports" / f"task-{running}"
    leftover.mkdir(parents=True)
    (leftover / "partial.bin").write_bytes(b"half a model")
    lora = shutil.copy(tiny.lora, import_root / "style.safetensors")
    queued = _insert(first, kind=TaskKind.SERVER, owner_id=admin.id, status=TaskStatus.QUEUED,
                     params_json=json.dumps({"paths": [str(lora)], "type": None, "in_place": True,
                                             "visibility": "everyone"}),
                     items_json=json.dumps([{"source": str(lora), "type": None, "file_name": "style.safetensors"}]))
    secret = _insert(first, kind=TaskKind.URL, owner_id=admin.id, status=TaskStatus.QUEUED,
                     params_json=json.dumps({"urls": ["https://example.com/x?token=***"], "type": "lora",
                                             "visibility": "everyone", "resumable": False}),
                     items_json=json.dumps([{"source": "https://example.com/x?token=***"}]))
    first.close()

    second = build_studio()
    tasks = second.model_services.tasks
    failed = tasks.get(actor=admin, task_id=running)
    assert failed.status == TaskStatus.FAILED and "restart" in failed.message
    assert json.loads(failed.items_json)[0]["state"] == "failed"
    assert not leftover.exists()
    with second.db.read() as s:
        assert s.get(ModelRecord, reserved.id) is None
    assert wait_task(second, queued).status == TaskStatus.SUCCEEDED
    assert second.models.find(actor=admin, type="lora", ref="style").status == ModelStatus.ACTIVE
    not_resumed = tasks.get(actor=admin, task_id=secret)
    assert not_resumed.status == TaskStatus.FAILED and "credentials" in not_resumed.message


def test_interrupted_upload_import_can_be_completed_again(build_studio, tiny):
    from fastapi.testclient import TestClient

    data = tiny.lora.read_bytes()
    first = build_studio()
    with TestClient(first.app, follow_redirects=False) as client:
        login(client, "admin", ADMIN_PASSWORD)
        upload = client.post("/api/v1/uploads", json={"file_name": "style.safetensors", "size": len(data),
                                                      "type": "lora"}).json()
        client.put(f"/api/v1/uploads/{upload['id']}?offset=0", content=data)
    # as if the server died while the import task ran
    task_id = _insert(first, kind=TaskKind.UPLOAD, owner_id=admin_of(first).id, status=TaskStatus.RUNNING,
                      params_json=json.dumps({"upload_id": upload["id"]}),
                      items_json=json.dumps([{"source": "style.safetensors", "state": "hashing",
                                              "reserved_id": upload["model_id"]}]))
    with first.db.write() as s:
        row = s.get(UploadSession, upload["id"])
        row.status, row.task_id = "completing", task_id
        s.add(row)
    first.close()

    second = build_studio()
    with TestClient(second.app, follow_redirects=False) as client:
        login(client, "admin", ADMIN_PASSWORD)
        status = client.get(f"/api/v1/uploads/{upload['id']}").json()
        assert (status["status"], status["received"]) == ("open", len(data))  # the bytes were kept
        assert client.get(f"/api/v1/tasks/{task_id}").json()["status"] == "failed"
        retry = client.post(f"/api/v1/uploads/{upload['id']}/complete").json()
        assert wait_task(second, retry["id"]).status == TaskStatus.SUCCEEDED
        models = client.get("/api/v1/models", params={"status": "all"}).json()
    assert [(m["name"], m["status"]) for m in models["items"]] == [("style", "Active")]
