"""Endpoints other than ``local`` get their backend from the registry by kind, with a dispatcher each."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ADMIN_PASSWORD
from tests.fixtures.studio_models import build_model_studio, tiny_model_files  # noqa: F401 - fixture
from tests.jobs.conftest import txt2img
from webapp.records import EndpointStatus, JobStatus
from webapp.services.errors import Conflict


def test_stored_endpoints_run_jobs_after_a_restart_and_broken_ones_say_why(tmp_path, tiny_model_files):  # noqa: F811
    from webapp.settings import Settings

    def make(**overrides: Any) -> Settings:
        return Settings(data_dir=tmp_path / "data", admin_password=ADMIN_PASSWORD, **overrides)

    with build_model_studio(make, tiny_model_files, backend="fake") as first:
        endpoints = first.studio.jobs.endpoints
        endpoints.ensure(name="second", kind="fake", remote=True, capabilities={}, config={"slots": 2, "remote": True},
                         is_default=False, status=EndpointStatus.IN_SERVICE)
        endpoints.ensure(name="broken", kind="no-such-kind", remote=True, capabilities={}, config={},
                         is_default=False, status=EndpointStatus.IN_SERVICE)
        # Recorded after this server started: refused at once instead of queued forever.
        with pytest.raises(Conflict, match="no backend running"):
            first.studio.jobs.submit(actor=first.admin, mode="txt2img", request=txt2img(), endpoint="second")

    with build_model_studio(make, tiny_model_files, backend="fake") as again:
        jobs, admin = again.studio.jobs, again.admin
        second = jobs.endpoints.get(actor=admin, name="second")
        assert second.status == EndpointStatus.IN_SERVICE and second.remote
        job = jobs.submit(actor=admin, mode="txt2img", request=txt2img(), endpoint="second")
        done = jobs.wait(actor=admin, job_id=job.id, timeout=30)
        assert done.status == JobStatus.SUCCEEDED and done.endpoint == "second"
        assert done.worker.startswith("second/")
        broken = jobs.endpoints.get(actor=admin, name="broken")
        assert broken.status == EndpointStatus.FAILED and "unknown backend kind 'no-such-kind'" in broken.error
        with pytest.raises(Conflict, match="Failed"):
            jobs.submit(actor=admin, mode="txt2img", request=txt2img(), endpoint="broken")
        # The default endpoint is untouched by the others.
        assert jobs.endpoints.default_name() == "local"


def test_eight_slots_run_every_job_exactly_once(tmp_path, tiny_model_files):  # noqa: F811
    """The dispatcher feeding a backend with 8 workers: claims never hand a job out twice."""
    from webapp.settings import Settings

    def make(**overrides: Any) -> Settings:
        return Settings(data_dir=tmp_path / "data", admin_password=ADMIN_PASSWORD, **overrides)

    with build_model_studio(make, tiny_model_files, backend="fake",
                            backend_options={"slots": 8, "step_delay": 0.002}) as built:
        jobs, admin = built.studio.jobs, built.admin
        users = [built.studio.users.create_user(actor=admin, username=f"user{i}", password="user-password-1")
                 for i in range(4)]
        submitted = [jobs.submit(actor=users[i % 4], mode="txt2img", request=txt2img(seed=i, steps=5)).id
                     for i in range(48)]
        done = [jobs.wait(actor=admin, job_id=job_id, timeout=60) for job_id in submitted]
        assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 48
        ran = jobs.backend("local").jobs_run
        assert sorted(ran) == sorted(submitted), "every job ran, none twice"
        assert len({j.worker for j in done}) > 1, "the eight workers shared the work"
