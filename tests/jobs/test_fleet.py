"""The fleet: endpoints started and stopped while the server runs, and their health (Degraded / InService)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.jobs.conftest import txt2img
from webapp.records import Endpoint, EndpointStatus, JobStatus


@pytest.fixture
def flaky(fake_studio) -> Iterator[str]:
    """A fake endpoint started at run time (no restart), removed after the test."""
    fleet = fake_studio.studio.fleet
    assert fleet.start_endpoint("flaky", "fake", {"step_delay": 0.001}) == EndpointStatus.IN_SERVICE
    yield "flaky"
    fake_studio.studio.endpoint_admin.delete(actor=fake_studio.admin, name="flaky")


def _status(studio, name: str) -> Endpoint:
    return studio.jobs.endpoints.get(actor=studio.users.get_by_name("admin"), name=name)


def test_an_endpoint_started_at_run_time_runs_jobs(fake_studio, flaky):
    jobs, admin = fake_studio.studio.jobs, fake_studio.admin
    job = jobs.submit(actor=admin, mode="txt2img", request=txt2img(), endpoint=flaky)
    done = jobs.wait(actor=admin, job_id=job.id, timeout=30)
    assert done.status == JobStatus.SUCCEEDED and done.worker.startswith("flaky/")


def test_an_unhealthy_backend_degrades_its_endpoint_and_its_jobs_wait_until_it_recovers(fake_studio, flaky):
    studio, admin = fake_studio.studio, fake_studio.admin
    verdict: list[tuple[bool, str | None]] = [(False, "the worker does not answer")]
    studio.jobs.backend(flaky).health = lambda: verdict[0]

    studio.fleet.poll_health()
    degraded = _status(studio, flaky)
    assert degraded.status == EndpointStatus.DEGRADED and degraded.error == "the worker does not answer"
    job = studio.jobs.submit(actor=admin, mode="txt2img", request=txt2img(), endpoint=flaky)  # accepted: it waits
    assert studio.jobs.wait(actor=admin, job_id=job.id, timeout=0.5).status == JobStatus.QUEUED

    verdict[0] = (True, None)
    studio.fleet.poll_health()
    healthy = _status(studio, flaky)
    assert healthy.status == EndpointStatus.IN_SERVICE and healthy.error is None
    assert studio.jobs.wait(actor=admin, job_id=job.id, timeout=30).status == JobStatus.SUCCEEDED


def test_a_healthy_poll_records_what_the_backend_now_says_it_runs(fake_studio, flaky):
    """A remote worker reports its samplers once it answers; the poll records them for the Generate tabs."""
    import dataclasses

    studio = fake_studio.studio
    backend = studio.jobs.backend(flaky)
    reported = dataclasses.replace(backend.capabilities(), samplers=("Euler a",))
    backend.capabilities = lambda: reported
    assert _status(studio, flaky).capabilities["samplers"] != ["Euler a"]
    studio.fleet.poll_health()
    assert _status(studio, flaky).capabilities["samplers"] == ["Euler a"]


def test_a_health_check_that_raises_counts_as_unhealthy_and_local_stays_in_service(fake_studio, flaky):
    studio = fake_studio.studio

    def broken() -> tuple[bool, str | None]:
        raise ConnectionError("connection refused")

    studio.jobs.backend(flaky).health = broken
    studio.fleet.poll_health()
    row = _status(studio, flaky)
    assert row.status == EndpointStatus.DEGRADED and "connection refused" in row.error
    assert _status(studio, "local").status == EndpointStatus.IN_SERVICE  # the default backend's health: healthy


def test_the_health_thread_polls_on_its_own(fake_studio, flaky):
    studio = fake_studio.studio
    studio.jobs.backend(flaky).health = lambda: (False, "down")
    studio.fleet.stop()
    studio.fleet.start(0.02)
    try:
        deadline = time.monotonic() + 20
        while _status(studio, flaky).status != EndpointStatus.DEGRADED and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _status(studio, flaky).status == EndpointStatus.DEGRADED
    finally:
        studio.fleet.stop()
        studio.fleet.start(studio.settings.endpoint_health_seconds)


def test_a_backend_that_crashes_while_being_built_leaves_its_endpoint_failed_with_the_reason(fake_studio, monkeypatch):
    from deploy.backends import registry

    def explode(config):
        raise RuntimeError("the driver is missing")

    monkeypatch.setitem(registry._FACTORIES, "explodes", explode)
    studio = fake_studio.studio
    try:
        assert studio.fleet.start_endpoint("crater", "explodes", {}) == EndpointStatus.FAILED
        row = _status(studio, "crater")
        assert row.status == EndpointStatus.FAILED and row.error == "the driver is missing"
        assert "crater" not in studio.jobs.dispatchers()
    finally:
        studio.endpoint_admin.delete(actor=fake_studio.admin, name="crater")
