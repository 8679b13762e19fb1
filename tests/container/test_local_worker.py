"""The worker on the real LocalBackend: a tiny SD1.5 checkpoint from the asset store, generated on the CPU.

The same JobSpec run through ``/invocations`` and through a LocalBackend in this process gives the same PNG
bytes; the model comes from the store into the worker's own cache (the control plane's ``local_path`` is not
visible to it); a ref the worker can reach neither way fails ``internal`` naming the file.
"""

from __future__ import annotations

import hashlib
import os
import queue
from pathlib import Path

import httpx
import pytest

from deploy.backends.messages import Failed, JobModels, JobSpec, ModelSpec, Succeeded, event_from_dict
from deploy.model_files import ModelFileRef
from tests.container.worker import SECRET, auth
from tests.live import serve

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KEY = "models/checkpoint/tiny-sd15.safetensors"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.fixtures.studio_models import tiny_model_file_set

    files = tiny_model_file_set()
    store_dir = tmp_path_factory.mktemp("worker-store")
    data = files.checkpoint.read_bytes()
    from deploy.storage import LocalStore

    LocalStore(store_dir).put_file(KEY, files.checkpoint)
    return {"store": store_dir, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
            "skeletons": files.skeleton_root}


def _spec(checkpoint, job_id: str, *, local_path: str | None, store_key: str | None = KEY) -> JobSpec:
    from pipelines.types import GenerationRequest

    ref = ModelFileRef(sha256=checkpoint["sha256"], store_key=store_key, local_path=local_path,
                       size=checkpoint["size"])
    models = JobModels(checkpoint=ModelSpec(kind="checkpoint", name="tiny-sd15", sha256=checkpoint["sha256"],
                                            file=ref))
    request = GenerationRequest(prompt="a red fox", steps=4, width=64, height=64, seed=11, batch_size=2)
    return JobSpec(job_id=job_id, mode="txt2img", request=request.to_dict(), models=models)


def _direct(checkpoint, spec: JobSpec, cache: Path):
    """The same spec through a LocalBackend in this process, as the app's own endpoint runs it."""
    from deploy.backends.local import LocalBackend
    from deploy.model_files import ModelFiles
    from deploy.storage import LocalStore

    events: queue.Queue = queue.Queue()
    backend = LocalBackend("direct", model_files=ModelFiles(LocalStore(checkpoint["store"]), cache, 1 << 30),
                           devices="cpu", skeleton_dirs=[checkpoint["skeletons"]], preview_every=0, cache_gb=1.0)
    backend.start(events.put)
    try:
        backend.submit(spec)
        while True:
            event = events.get(timeout=120)
            if isinstance(event, Succeeded | Failed):
                return event
    finally:
        backend.stop(5)


def test_invocations_on_the_local_backend_match_the_local_backend_byte_for_byte(checkpoint, tmp_path):
    from deploy.container.config import WorkerSettings
    from deploy.container.serve import build

    settings = WorkerSettings(backend="local", store=str(checkpoint["store"]), cache_dir=tmp_path / "worker-cache",
                              cache_gb=1.0, devices="cpu", skeleton_dirs=[checkpoint["skeletons"]], preview_every=0,
                              pipeline_cache_gb=1.0, secret=SECRET, host="127.0.0.1")
    host, app = build(settings)
    try:
        with serve(app) as url, httpx.Client(base_url=url, headers=auth(), timeout=180) as client:
            assert client.get("/v1/info").json()["capabilities"]["devices"] == ["cpu"]
            # the control plane's in-place path does not exist here: the worker takes the store copy
            spec = _spec(checkpoint, "remote-1", local_path="/control-plane/models/tiny-sd15.safetensors")
            answer = client.post("/invocations", content=spec.to_json())
            assert answer.status_code == 200, answer.text
            remote = event_from_dict(answer.json())
            assert isinstance(remote, Succeeded), remote
            cached = list((tmp_path / "worker-cache").glob(f"*/{checkpoint['sha256']}.safetensors"))
            assert len(cached) == 1, "fetched into the worker's cache"

            unreachable = _spec(checkpoint, "remote-2", local_path="/control-plane/models/gone.safetensors",
                                store_key=None)
            failed = event_from_dict(client.post("/invocations", content=unreachable.to_json()).json())
            assert isinstance(failed, Failed) and failed.kind == "internal"
            assert "checkpoint 'tiny-sd15'" in failed.message
            assert "/control-plane/models/gone.safetensors" in failed.message
            missing = _spec({**checkpoint, "sha256": "ef" * 32}, "remote-3", local_path=None,
                            store_key="models/checkpoint/missing.safetensors")
            failed = event_from_dict(client.post("/invocations", content=missing.to_json()).json())
            assert isinstance(failed, Failed) and failed.kind == "internal", failed
            assert "checkpoint 'tiny-sd15'" in failed.message and "missing.safetensors" in failed.message
    finally:
        host.stop(10)
    local = _direct(checkpoint, _spec(checkpoint, "local-1", local_path=None), tmp_path / "direct-cache")
    assert isinstance(local, Succeeded), local
    assert len(remote.images) == 2 and remote.images == local.images, "the same bytes as the local backend"
    assert remote.infotexts == local.infotexts and remote.seeds == local.seeds == (11, 12)
