"""Jobs on a self-hosted worker endpoint (``http`` kind), through the queue and the dispatcher.

The worker is the real serving container process (fake backend inside) on 127.0.0.1; the studio records
the endpoint through the administrators' service (``deploy_http_endpoint_in``) and runs its backend beside the local one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN_PASSWORD
from tests.fixtures.endpoints import WORKER_ENDPOINT, deploy_http_endpoint_in
from tests.fixtures.studio_models import ModelStudio, build_model_studio
from tests.fixtures.worker_process import WorkerProcess
from tests.jobs.conftest import FAKE_OPTIONS, txt2img
from webapp.records import EndpointStatus, JobStatus


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(tmp_path / "worker", backend="fake",
                            backend_options={"step_delay": 0.03, "preview_every": 1})
    with process:
        yield process


@pytest.fixture
def studio(tmp_path: Path, tiny_model_files, worker: WorkerProcess) -> Iterator[ModelStudio]:  # noqa: ANN001
    from webapp.settings import Settings

    def make(**overrides: Any) -> Settings:
        return Settings(data_dir=tmp_path / "data", admin_password=ADMIN_PASSWORD, **overrides)

    with build_model_studio(make, tiny_model_files, backend="fake", backend_options=FAKE_OPTIONS) as built:
        deploy_http_endpoint_in(built, url=worker.url, secret=worker.secret)
        yield built


def wait_status(studio: ModelStudio, job_id: str, status: JobStatus, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = studio.jobs.get(actor=studio.admin, job_id=job_id)
        if job.status == status:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} is {job.status}, not {status}, after {timeout}s ({job.error})")
        time.sleep(0.05)


def test_the_worker_endpoint_runs_jobs_and_says_it_is_remote(studio):
    endpoint = studio.jobs.endpoints.get(actor=studio.admin, name=WORKER_ENDPOINT)
    assert (endpoint.kind, endpoint.remote, endpoint.status) == ("http", True, EndpointStatus.IN_SERVICE)
    job = studio.jobs.submit(actor=studio.admin, mode="txt2img", request=txt2img(steps=3), endpoint=WORKER_ENDPOINT)
    done = studio.jobs.wait(actor=studio.admin, job_id=job.id, timeout=60)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert done.worker == f"{WORKER_ENDPOINT}/worker/fake0"
    assert studio.jobs.images(actor=studio.admin, job_id=job.id)[0].startswith(b"\x89PNG")


def test_a_job_whose_worker_is_killed_is_requeued_and_runs_again_once_a_worker_is_back(studio, worker):
    job = studio.jobs.submit(actor=studio.admin, mode="txt2img", request=txt2img(steps=150, seed=9),
                             endpoint=WORKER_ENDPOINT)
    wait_status(studio, job.id, JobStatus.RUNNING, 30)
    deadline = time.monotonic() + 30
    while not studio.jobs.get(actor=studio.admin, job_id=job.id).step and time.monotonic() < deadline:
        time.sleep(0.05)  # it is really running on the worker
    worker.kill()
    worker.start()  # a restarted box at the same address; the job is not there any more
    requeued_or_rerun = wait_status(studio, job.id, JobStatus.SUCCEEDED, 120)
    assert requeued_or_rerun.attempts == 2, "it ran a second time, on the restarted worker"
    assert requeued_or_rerun.endpoint == WORKER_ENDPOINT
    assert "Seed: 9" in requeued_or_rerun.infotexts[0]
