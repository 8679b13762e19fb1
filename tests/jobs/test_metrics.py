"""``/metrics`` on the fake backend: jobs that succeed, fail, get lost and get cancelled show up in the
Prometheus exposition (parsed with prometheus_client's own parser); only administrators and the holder
of the metrics token may read it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_PASSWORD, login
from tests.fixtures.studio_models import ModelStudio, build_model_studio
from tests.jobs.conftest import FAKE_OPTIONS, USER_PASSWORD, add_user, empty_queue, txt2img
from webapp.records import JobStatus

TOKEN = "metrics-scrape-token-0123456789"
OPTIONS = {**FAKE_OPTIONS, "fail_prompts": {**FAKE_OPTIONS["fail_prompts"], "interrupted": "LOSE-WORKER"}}


@pytest.fixture(scope="module")
def metrics_studio(tmp_path_factory, tiny_model_files) -> Iterator[ModelStudio]:
    from webapp.settings import Settings

    data_dir = tmp_path_factory.mktemp("metrics-studio") / "data"

    def make(**overrides: Any) -> Settings:
        return Settings(data_dir=data_dir, admin_password=ADMIN_PASSWORD, **overrides)

    with build_model_studio(make, tiny_model_files, backend="fake", backend_options=OPTIONS, job_max_attempts=2,
                            metrics_token=TOKEN) as built:
        yield built


@pytest.fixture
def studio(metrics_studio) -> Iterator[ModelStudio]:
    yield metrics_studio
    empty_queue(metrics_studio)


@pytest.fixture
def client(studio) -> Iterator[TestClient]:
    with TestClient(studio.app, follow_redirects=False) as c:
        yield c


def scrape(client: TestClient) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def run(studio, prompt: str, expected: JobStatus) -> None:
    job = studio.jobs.submit(actor=studio.admin, mode="txt2img", request=txt2img(prompt=prompt))
    assert studio.jobs.wait(actor=studio.admin, job_id=job.id, timeout=30).status == expected


def test_finished_jobs_are_counted_and_timed_per_endpoint(studio, client):
    before = scrape(client)
    run(studio, "a red fox", JobStatus.SUCCEEDED)
    run(studio, "a fox, OOM-PLEASE", JobStatus.FAILED)
    run(studio, "a fox, CRASH-PLEASE", JobStatus.FAILED)
    run(studio, "a fox, LOSE-WORKER", JobStatus.FAILED)  # lost twice: re-queued once, then given up
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("studio_jobs_finished_total", endpoint="local", status="succeeded") == 1
    assert grew("studio_jobs_finished_total", endpoint="local", status="failed") == 3
    assert grew("studio_job_failures_total", endpoint="local", kind="oom") == 1
    assert grew("studio_job_failures_total", endpoint="local", kind="internal") == 1
    assert grew("studio_job_failures_total", endpoint="local", kind="interrupted") == 2
    assert grew("studio_job_failures_total", endpoint="local", kind="bad_request") == 0
    assert grew("studio_job_queue_wait_seconds_count", endpoint="local") == 5, "one wait per start (5 starts)"
    assert grew("studio_job_run_seconds_count", endpoint="local", mode="txt2img") == 1, "successful runs only"
    assert value(after, "studio_job_run_seconds_sum", endpoint="local", mode="txt2img") > 0
    assert value(after, "studio_jobs_queued", endpoint="local") == 0
    assert value(after, "studio_jobs_running", endpoint="local") == 0
    assert value(after, "studio_endpoint_up", endpoint="local", status="InService") == 1


def test_queue_depth_and_running_jobs_are_read_at_scrape_time(studio, client):
    jobs, admin = studio.jobs, studio.admin
    running = jobs.submit(actor=admin, mode="txt2img", request=txt2img(steps=150, n_iter=100))
    deadline = time.monotonic() + 10
    while jobs.get(actor=admin, job_id=running.id).status != JobStatus.RUNNING:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.01)
    queued = [jobs.submit(actor=admin, mode="txt2img", request=txt2img()) for _ in range(2)]
    before = scrape(client)
    assert value(before, "studio_jobs_running", endpoint="local") == 1
    assert value(before, "studio_jobs_queued", endpoint="local") == 2
    for job in [*queued, running]:
        jobs.cancel(actor=admin, job_id=job.id)
    assert jobs.wait(actor=admin, job_id=running.id, timeout=30).status == JobStatus.CANCELLED
    after = scrape(client)
    assert value(after, "studio_jobs_queued", endpoint="local") == 0
    cancelled = value(after, "studio_jobs_finished_total", endpoint="local", status="cancelled") - value(
        before, "studio_jobs_finished_total", endpoint="local", status="cancelled")
    assert cancelled == 3, "jobs cancelled while queued or running are finished too"


def test_administrators_and_the_token_read_metrics_others_do_not(studio, client):
    add_user(studio, "metrics-user")
    assert client.get("/metrics").status_code == 401, "anonymous"
    assert client.get("/metrics", auth=("metrics-user", USER_PASSWORD)).status_code == 403
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    admin = client.get("/metrics", auth=("admin", ADMIN_PASSWORD))
    assert admin.status_code == 200 and "studio_jobs_queued" in admin.text
    scraped = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert scraped.status_code == 200 and "studio_jobs_queued" in scraped.text
    assert scraped.headers["x-content-type-options"] == "nosniff", "the token's answer passes the security headers"


def test_an_admin_session_reads_metrics_and_the_token_opens_nothing_else(studio):
    with TestClient(studio.app, follow_redirects=False) as browser:
        login(browser, "admin", ADMIN_PASSWORD)
        assert browser.get("/metrics").status_code == 200
    with TestClient(studio.app, follow_redirects=False) as scraper:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert scraper.get("/api/v1/jobs", headers=bearer).status_code == 401
        assert scraper.post("/metrics", headers=bearer).status_code in (401, 405)


def test_without_a_token_setting_no_bearer_reads_metrics(fake_studio):
    with TestClient(fake_studio.app, follow_redirects=False) as c:
        assert c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
        assert c.get("/metrics", auth=("admin", ADMIN_PASSWORD)).status_code == 200


def test_two_studios_keep_their_metrics_apart(studio, fake_studio):
    assert studio.studio.metrics.registry is not fake_studio.studio.metrics.registry
    from prometheus_client import REGISTRY

    assert "studio_jobs_finished_total" not in REGISTRY._names_to_collectors, "the global registry stays unused"
