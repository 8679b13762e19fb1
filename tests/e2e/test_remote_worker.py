"""End to end: the studio sends jobs to a self-hosted worker — the serving container as a real process.

The worker (``python -m deploy.container serve --backend local``) reads model files from the studio's own
asset-store directory into its own cache, with a shared secret. The studio runs as a real server on
127.0.0.1 and is driven over its REST API. A txt2img with a LoRA through the worker gives the very pixels
the local endpoint gives for the same seed; a worker killed mid-job gets its job requeued, and once the
worker is restarted the job runs again and succeeds.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_PASSWORD
from tests.fixtures.endpoints import WORKER_ENDPOINT, deploy_http_endpoint
from tests.fixtures.studio_models import LORA, ModelStudio, build_model_studio, tiny_model_files  # noqa: F401
from tests.fixtures.worker_process import WorkerProcess
from tests.live import serve

TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Remote:
    studio: ModelStudio
    worker: WorkerProcess
    api: httpx.Client


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory, tiny_model_files) -> Iterator[Remote]:  # noqa: ANN001, F811
    from webapp.settings import Settings

    root = tmp_path_factory.mktemp("remote-worker")

    def make(**overrides: Any) -> Settings:
        return Settings(data_dir=root / "data", admin_password=ADMIN_PASSWORD, **overrides)

    store = make().store_url
    worker = WorkerProcess(root / "worker", backend="local", store=store, cache_dir=root / "worker-cache",
                           extra_args=("--devices", "cpu", "--preview-every", "1", "--pipeline-cache-gb", "1",
                                       "--skeleton-dirs", str(tiny_model_files.skeleton_root)))
    worker.start()
    try:
        with build_model_studio(make, tiny_model_files, backend="local", devices="cpu", preview_every=1) as built, \
                serve(built.studio.app) as base, \
                httpx.Client(base_url=base, auth=("admin", ADMIN_PASSWORD), timeout=60) as api:
            deploy_http_endpoint(api, url=worker.url, secret=worker.secret)  # registered through the API
            yield Remote(built, worker, api)
    finally:
        worker.stop(10)


def submit(api: httpx.Client, endpoint: str, **request: Any) -> dict[str, Any]:
    body = {"prompt": f"a lighthouse <lora:{LORA}:1>", "steps": 8, "width": 64, "height": 64, "seed": 42,
            "sampler_name": "Euler", **request}
    response = api.post("/api/v1/jobs", json={"mode": "txt2img", "request": body, "endpoint": endpoint})
    assert response.status_code == 201, response.text
    return response.json()


def wait_job(api: httpx.Client, job_id: str, until: Any, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/api/v1/jobs/{job_id}").json()
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not get there within {timeout}s: {job}")
        time.sleep(0.1)


def finished(api: httpx.Client, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    return wait_job(api, job_id, lambda job: job["status"] in TERMINAL, timeout)


def pixels(api: httpx.Client, job: dict[str, Any]) -> bytes:
    from PIL import Image

    response = api.get(f"/api/v1/jobs/{job['id']}/images/0")
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(response.content)) as image:
        return image.convert("RGB").tobytes()


def test_the_worker_endpoint_is_listed_as_remote_and_in_service(remote: Remote):
    listing = remote.api.get("/api/v1/endpoints")
    assert remote.worker.secret not in listing.text, "the secret is never shown, not even to administrators"
    endpoints = {e["name"]: e for e in listing.json()["endpoints"]}
    worker = endpoints[WORKER_ENDPOINT]
    assert (worker["kind"], worker["remote"], worker["status"]) == ("http", True, "InService")


def test_a_lora_txt2img_on_the_worker_matches_the_local_endpoint_pixel_for_pixel(remote: Remote):
    on_worker = finished(remote.api, submit(remote.api, WORKER_ENDPOINT)["id"])
    on_local = finished(remote.api, submit(remote.api, "local")["id"])
    assert on_worker["status"] == on_local["status"] == "succeeded", (on_worker["error"], on_local["error"])
    assert on_worker["endpoint"] == WORKER_ENDPOINT and on_local["endpoint"] == "local"
    infotext = on_worker["images"][0]["infotext"]
    assert f'Lora hashes: "{LORA}: ' in infotext and "Seed: 42" in infotext
    assert pixels(remote.api, on_worker) == pixels(remote.api, on_local)
    without_lora = finished(remote.api, submit(remote.api, WORKER_ENDPOINT, prompt="a lighthouse")["id"])
    assert pixels(remote.api, without_lora) != pixels(remote.api, on_worker), "the LoRA was applied on the worker"
    worker_cache = remote.worker.workdir.parent / "worker-cache"
    assert any(p.suffix == ".safetensors" for p in worker_cache.rglob("*")), "the worker fetched from the store"


def test_a_worker_killed_mid_job_gets_the_job_requeued_and_run_again_once_restarted(remote: Remote):
    api = remote.api
    job = submit(api, WORKER_ENDPOINT, steps=150, seed=7)
    wait_job(api, job["id"], lambda j: j["status"] == "running" and j["step"] > 0, 120)
    remote.worker.kill()
    remote.worker.start()
    done = finished(api, job["id"], 180)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2, "it ran again after the worker was lost"
    assert done["endpoint"] == WORKER_ENDPOINT and "Seed: 7" in done["images"][0]["infotext"]
