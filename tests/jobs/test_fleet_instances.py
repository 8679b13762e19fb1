"""Two studio instances (two app objects) on one database and one asset store: an endpoint deployed, deleted,
stopped or redeployed through one instance reaches the other at its next poll (``Fleet.sync``), and the two do
not flip the shared row's Degraded. The health thread is off (``endpoint_health_seconds=0``): each test polls
by hand, so "within a poll" is exact. SQLite file and PostgreSQL (``database_url``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ADMIN_PASSWORD
from tests.fixtures.studio_models import ModelStudio, build_model_studio, tiny_model_files  # noqa: F401
from tests.jobs.conftest import FAKE_OPTIONS, txt2img
from webapp.records import Endpoint, EndpointStatus, Job, JobStatus
from webapp.services.jobs import Deployment

WAIT_SECONDS = 30.0


@pytest.fixture
def two(tmp_path, database_url, tiny_model_files) -> Iterator[tuple[Any, Any, Any]]:  # noqa: F811
    """(a, b, admin): two studios on the fake backend sharing ``database_url`` and one store."""
    import app
    from webapp.settings import Settings

    store = str(tmp_path / "store")

    def settings(name: str) -> Any:
        return lambda **values: Settings(data_dir=tmp_path / name, admin_password=ADMIN_PASSWORD,
                                         database_url=database_url, store=store, endpoint_health_seconds=0,
                                         **values)

    with build_model_studio(settings("a"), tiny_model_files, backend="fake", backend_options=FAKE_OPTIONS) as a:
        b = app.build(settings("b")(skeleton_dirs=[tiny_model_files.skeleton_root], devices="cpu",
                                    backend="fake", backend_options=FAKE_OPTIONS))
        try:
            yield a.studio, b, a.admin
        finally:
            b.close()


def _deploy(studio: Any, admin: Any, name: str = "shared", **options: Any) -> None:
    studio.endpoint_admin.deploy(actor=admin, request=Deployment(kind="fake", name=name,
                                                                 options={"step_delay": 0.001, **options}))


def _wait_running(studio: Any, admin: Any, job_id: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while studio.jobs.get(actor=admin, job_id=job_id).status == JobStatus.QUEUED:
        assert time.monotonic() < deadline, f"job {job_id} never started"
        time.sleep(0.05)


def _lease_owner(studio: Any, job_id: str) -> str | None:
    with studio.db.read() as s:
        return s.get(Job, job_id).lease_owner


def test_an_endpoint_deployed_on_one_instance_runs_on_the_other_after_its_next_poll(two):
    a, b, admin = two
    _deploy(a, admin)
    assert "shared" not in b.jobs.dispatchers()
    a.jobs.dispatchers()["shared"].hold()  # only b can claim now
    job = a.jobs.submit(actor=admin, mode="txt2img", request=txt2img(), endpoint="shared")
    assert a.jobs.wait(actor=admin, job_id=job.id, timeout=0.5).status == JobStatus.QUEUED

    b.fleet.poll_health()
    assert "shared" in b.jobs.dispatchers()
    done = a.jobs.wait(actor=admin, job_id=job.id, timeout=WAIT_SECONDS)
    assert done.status == JobStatus.SUCCEEDED and done.worker.startswith("shared/")
    assert b.jobs.get(actor=admin, job_id=job.id).status == JobStatus.SUCCEEDED
    assert a.jobs.endpoints.find("shared").status == EndpointStatus.IN_SERVICE  # b's build wrote nothing over it
    mine = a.jobs.dispatchers()["shared"]
    a.fleet.poll_health()
    assert a.jobs.dispatchers()["shared"] is mine  # the deploying instance keeps what it built


def test_a_delete_on_one_instance_stops_the_others_dispatcher_and_its_running_job_moves_to_the_default(two):
    a, b, admin = two
    _deploy(a, admin, step_delay=2.0)  # 4 steps: 8 s, stopped long before that
    b.fleet.poll_health()
    a.jobs.dispatchers()["shared"].hold()
    job = a.jobs.submit(actor=admin, mode="txt2img", request=txt2img(), endpoint="shared")
    _wait_running(a, admin, job.id)
    assert _lease_owner(a, job.id) == b.jobs.queue.instance.id

    a.endpoint_admin.delete(actor=admin, name="shared")
    assert "shared" in b.jobs.dispatchers()
    b.fleet.poll_health()
    assert "shared" not in b.jobs.dispatchers()
    done = a.jobs.wait(actor=admin, job_id=job.id, timeout=WAIT_SECONDS)
    assert done.status == JobStatus.SUCCEEDED and done.endpoint == "local" and done.worker.startswith("local/")
    assert done.attempts == 1  # put back without being charged an attempt


def test_an_endpoint_stopped_on_one_instance_claims_nothing_on_either_until_it_is_back(two):
    a, b, admin = two
    _deploy(a, admin)
    b.fleet.poll_health()
    for studio in (a, b):
        studio.jobs.dispatchers()["shared"].hold()
    job = a.jobs.submit(actor=admin, mode="txt2img", request=txt2img(), endpoint="shared")

    a.jobs.endpoints.set_status_as(actor=admin, name="shared", status=EndpointStatus.STOPPED)
    a.fleet.poll_health()
    b.fleet.poll_health()  # healthy: without the Stopped row it would resume and claim
    assert a.jobs.dispatchers()["shared"].held and b.jobs.dispatchers()["shared"].held
    assert a.jobs.wait(actor=admin, job_id=job.id, timeout=0.5).status == JobStatus.QUEUED
    assert b.jobs.endpoints.find("shared").status == EndpointStatus.STOPPED  # nobody's poll wrote over it

    a.jobs.endpoints.set_status_as(actor=admin, name="shared", status=EndpointStatus.IN_SERVICE)
    b.fleet.poll_health()
    done = a.jobs.wait(actor=admin, job_id=job.id, timeout=WAIT_SECONDS)
    assert done.status == JobStatus.SUCCEEDED


def test_a_row_with_a_new_configuration_is_rebuilt_and_one_that_cannot_be_built_is_not_retried(two):
    a, b, admin = two
    _deploy(a, admin)
    b.fleet.poll_health()
    before = b.jobs.dispatchers()["shared"]
    b.fleet.poll_health()
    assert b.jobs.dispatchers()["shared"] is before  # a poll with nothing changed keeps it

    with a.db.write() as s:  # as a redeploy with other options would leave the row
        row = s.get(Endpoint, "shared")
        row.config_json = '{"step_delay": 0.002}'
        s.add(row)
    b.fleet.poll_health()
    after = b.jobs.dispatchers()["shared"]
    assert after is not before and after.backend.step_delay == 0.002

    with a.db.write() as s:
        row = s.get(Endpoint, "shared")
        row.config_json = "[1, 2]"
        s.add(row)
    b.fleet.poll_health()
    assert "shared" not in b.jobs.dispatchers()
    b.fleet.poll_health()  # remembered: not rebuilt (nor logged) at every poll
    assert "shared" not in b.jobs.dispatchers()
    assert b.jobs.endpoints.find("shared").status == EndpointStatus.IN_SERVICE  # the row keeps its deployer's word


def test_instances_that_disagree_about_health_do_not_flip_the_row(two):
    a, b, admin = two
    _deploy(a, admin)
    b.fleet.poll_health()
    a.jobs.backend("shared").health = lambda: (False, "a cannot reach the worker")

    a.fleet.poll_health()
    b.fleet.poll_health()  # b finds it healthy, but the Degraded is a's to clear
    row = b.jobs.endpoints.find("shared")
    assert row.status == EndpointStatus.DEGRADED and row.error == "a cannot reach the worker"
    assert not b.jobs.dispatchers()["shared"].held  # b still claims its jobs

    a.jobs.backend("shared").health = lambda: (True, None)
    a.fleet.poll_health()
    assert a.jobs.endpoints.find("shared").status == EndpointStatus.IN_SERVICE


def test_a_poll_never_moves_a_row_back_to_creating(two):
    """A cloud watcher built by a later start says Creating until its first answer: the row stays InService."""
    a, b, admin = two
    _deploy(a, admin)
    b.fleet.poll_health()
    b.jobs.backend("shared").status = lambda: ("Creating", "waiting for SageMaker's first answer")
    b.fleet.poll_health()
    assert a.jobs.endpoints.find("shared").status == EndpointStatus.IN_SERVICE
    b.jobs.backend("shared").status = lambda: ("Failed", "SageMaker says the endpoint is Failed")
    b.fleet.poll_health()
    row = next(e for e in a.jobs.endpoints.stored(fresh=True) if e.name == "shared")  # b wrote it: a's cache is older
    assert row.status == EndpointStatus.FAILED and row.error == "SageMaker says the endpoint is Failed"
