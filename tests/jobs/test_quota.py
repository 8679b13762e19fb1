"""Per-user disk quota on jobs: what a job stores is recorded, summed per user, shown, and a user at the
limit gets no new job (413 naming ``quota``) on any API until they delete some; administrators are not
limited. Also: jobs recorded before sizes were kept are measured at start."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr
import pytest
from fastapi.testclient import TestClient
from sqlmodel import update

from tests.conftest import ADMIN_PASSWORD, login
from tests.fixtures.studio_models import ModelStudio, build_model_studio
from tests.jobs.conftest import FAKE_OPTIONS, USER_PASSWORD, add_user, empty_queue, txt2img
from webapp.records import Job, JobStatus

ONE_BYTE_GB = 1 / 1024**3
"""A quota of one byte: the first job is accepted (nothing stored yet), none after it."""


@pytest.fixture(scope="module")
def quota_studio(tmp_path_factory, tiny_model_files) -> Iterator[ModelStudio]:
    from webapp.settings import Settings

    data_dir = tmp_path_factory.mktemp("quota") / "data"

    def make(**overrides: Any) -> Settings:
        return Settings(data_dir=data_dir, admin_password=ADMIN_PASSWORD, **overrides)

    with build_model_studio(make, tiny_model_files, backend="fake", backend_options=FAKE_OPTIONS,
                            user_quota_gb=ONE_BYTE_GB) as built:
        yield built


@pytest.fixture
def alice(quota_studio) -> Iterator[TestClient]:
    add_user(quota_studio, "alice")
    with TestClient(quota_studio.app, follow_redirects=False) as client:
        login(client, "alice", USER_PASSWORD)
        yield client
    empty_queue(quota_studio)


def _blob_bytes(studio: ModelStudio, job: Job) -> int:
    return sum(studio.store.stat(key).size for key in job.image_keys)


def _row_bytes(job: Job) -> int:
    """The request as stored and the engine request validated from it."""
    return len(job.request_json.encode()) + len((job.engine_request_json or "").encode())


def test_a_user_at_the_quota_gets_no_new_job_until_they_delete(quota_studio, alice):
    jobs, user = quota_studio.jobs, add_user(quota_studio, "alice")
    assert alice.get("/api/v1/me/disk").json() == {"used_bytes": 0, "limit_bytes": 1}
    first = alice.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img(batch_size=2)})
    assert first.status_code == 201, first.text
    done = jobs.wait(actor=user, job_id=first.json()["id"], timeout=30)
    assert done.status == JobStatus.SUCCEEDED
    expected = _row_bytes(done) + _blob_bytes(quota_studio, done)
    assert done.stored_bytes == expected, "the request as stored plus the stored images"
    assert alice.get("/api/v1/me/disk").json() == {"used_bytes": expected, "limit_bytes": 1}

    refused = alice.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img()})
    assert refused.status_code == 413 and refused.json()["field"] == "quota", refused.text
    assert "quota" in refused.json()["detail"]
    a1111 = alice.post("/sdapi/v1/txt2img", json=txt2img())
    assert a1111.status_code == 413 and a1111.json()["field"] == "quota" and a1111.json()["error"] == "QuotaExceeded"
    assert jobs.list_jobs(actor=user)[1] == 1, "refused jobs leave no row"

    admin = quota_studio.admin
    assert jobs.submit(actor=admin, mode="txt2img", request=txt2img()).owner_id == admin.id, "admins are not limited"

    assert alice.delete(f"/api/v1/jobs/{done.id}").status_code == 204
    assert alice.get("/api/v1/me/disk").json()["used_bytes"] == 0
    assert alice.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img()}).status_code == 201


def test_the_account_tab_shows_disk_use(quota_studio, alice):
    from webapp.ui.account_tab import AccountTab
    from webapp.ui.context import UiContext

    studio = quota_studio.studio
    tab = AccountTab(UiContext(users=studio.users), tokens=studio.tokens, auth=studio.auth, quota=studio.quota)
    whoami, _, _ = tab.refresh(gr.Request(username="alice"))
    assert "Disk used: 0 B of 1 B" in whoami
    whoami, _, _ = tab.refresh(gr.Request(username="admin"))
    assert "(no limit)" in whoami


def test_jobs_recorded_before_sizes_were_kept_are_measured(quota_studio, alice):
    jobs, user = quota_studio.jobs, add_user(quota_studio, "alice")
    done = jobs.wait(actor=user, job_id=jobs.submit(actor=user, mode="txt2img", request=txt2img()).id, timeout=30)
    with quota_studio.db.write() as s:  # as an upgraded database holds it
        s.exec(update(Job).where(Job.id == done.id).values(stored_bytes=None))
    assert alice.get("/api/v1/me/disk").json()["used_bytes"] == 0
    assert jobs.measure_unmeasured_jobs() == 1
    expected = _row_bytes(done) + _blob_bytes(quota_studio, done)
    assert alice.get("/api/v1/me/disk").json()["used_bytes"] == expected
