"""Generation jobs go through the one authorisation rule (``webapp.services.access``) on every path: the service,
the UI handlers called as Gradio calls them, and HTTP (/api/v1 and /sdapi/v1). Submitting needs
``inference:create``, ``endpoint:use`` on the endpoint (the default one too) and ``model:use`` on every model;
cancelling, interrupting and skipping ``inference:update``; deleting ``inference:delete``. A refused call leaves
nothing queued or deleted."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gradio as gr
import pytest
from fastapi.testclient import TestClient
from sqlmodel import update

from deploy.backends.fake import FakeBackend
from tests.conftest import login
from tests.jobs.conftest import USER_PASSWORD, add_user, extra_endpoint, txt2img
from tests.jobs.test_ui import Tabs, form_values, req
from webapp.records import Endpoint, JobStatus
from webapp.services.access import encode_roles
from webapp.services.errors import NotFound, PermissionDenied
from webapp.ui.context import UiContext
from webapp.ui.history import HistoryPanel

GENERATE_BASICS = ["inference:list", "endpoint:list", "endpoint:use", "model:list", "model:use"]


def role(studio: Any, name: str, permissions: list[str], **quotas: int | None) -> Any:
    """The role ``name`` (made once per module studio)."""
    admin = studio.admin
    for found in studio.roles.list_roles(actor=admin):
        if found.name == name:
            return found
    return studio.roles.create_role(actor=admin, name=name, permissions=permissions, **quotas)


def member(studio: Any, username: str, *roles: str) -> Any:
    """A user holding exactly ``roles`` (made once per module studio)."""
    found = studio.users.get_by_name(username)
    if found is None:
        found = studio.users.create_user(actor=studio.admin, username=username, password=USER_PASSWORD,
                                         roles=list(roles))
    return found


def count(studio: Any) -> int:
    return studio.jobs.list_jobs(actor=studio.admin, all_users=True, limit=None)[1]


@contextmanager
def http(studio: Any, username: str) -> Iterator[TestClient]:
    with TestClient(studio.app, follow_redirects=False) as client:
        login(client, username, USER_PASSWORD)
        yield client


@contextmanager
def endpoint_roles(studio: Any, name: str, role_ids: list[int]) -> Iterator[None]:
    """Endpoint ``name`` reserved for ``role_ids`` for the block (the row's allowed roles, then read afresh)."""
    endpoints = studio.jobs.endpoints
    with studio.db.write() as s:
        s.exec(update(Endpoint).where(Endpoint.name == name).values(allowed_roles=encode_roles(role_ids)))
    endpoints.stored(fresh=True)
    try:
        yield
    finally:
        with studio.db.write() as s:
            s.exec(update(Endpoint).where(Endpoint.name == name).values(allowed_roles=""))
        endpoints.stored(fresh=True)


class ParkedBackend(FakeBackend):
    """Reports itself unhealthy, so the fleet's health check keeps its dispatcher held (it resumes healthy ones)."""

    def health(self) -> tuple[bool, str | None]:
        return False, "parked by the test"


@contextmanager
def parked(studio: Any) -> Iterator[str]:
    """An endpoint (yields its name) whose dispatcher claims nothing: jobs sent there stay queued (its endpoint
    shows Degraded, which still accepts jobs)."""
    with extra_endpoint(studio, "parking", ParkedBackend("parking")) as dispatcher:
        dispatcher.hold()
        yield "parking"


def form(tabs: Tabs, studio: Any, **values: Any) -> dict[Any, Any]:
    """The txt2img form as a user fills it: a prompt, the tiny checkpoint, the local endpoint, small and fast."""
    base = {"prompt": "a fox", "checkpoint": studio.models.checkpoint.title, "endpoint": "local", "steps": 4,
            "width": 64, "height": 64}
    return form_values(tabs.txt2img, **{**base, **values})


@pytest.fixture(scope="module")
def tabs(shared_fake_studio) -> Tabs:
    return Tabs(shared_fake_studio)


@pytest.fixture(scope="module")
def history(shared_fake_studio) -> HistoryPanel:
    return HistoryPanel(UiContext(users=shared_fake_studio.users), shared_fake_studio.jobs, "txt2img", ("txt2img",))


def test_a_designer_generates_and_a_user_without_inference_create_cannot(fake_studio, tabs):
    designer = add_user(fake_studio, "alice")  # new users are Designers
    job = fake_studio.jobs.submit(actor=designer, mode="txt2img", request=txt2img())
    assert fake_studio.jobs.wait(actor=designer, job_id=job.id, timeout=30).status == JobStatus.SUCCEEDED

    role(fake_studio, "Watcher", GENERATE_BASICS)
    watcher = member(fake_studio, "walt", "Watcher")
    before = count(fake_studio)
    with pytest.raises(PermissionDenied, match="inference:create"):
        fake_studio.jobs.submit(actor=watcher, mode="txt2img", request=txt2img())
    with pytest.raises(gr.Error, match="inference:create"):
        tabs.txt2img.submit(form(tabs, fake_studio), req(watcher))
    with http(fake_studio, "walt") as client:
        refused = client.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img()})
        assert refused.status_code == 403 and "inference:create" in refused.json()["detail"], refused.text
        a1111 = client.post("/sdapi/v1/txt2img", json=txt2img())
        assert a1111.status_code == 403 and a1111.json()["error"] == "PermissionDenied", a1111.text
    assert count(fake_studio) == before, "a refused submit queues nothing"


def test_an_endpoint_with_allowed_roles_takes_jobs_only_from_those_roles(fake_studio, tabs):
    designer = add_user(fake_studio, "alice")
    operator = member(fake_studio, "olga", "IT Operator")
    operators = next(r for r in fake_studio.roles.list_roles(actor=fake_studio.admin) if r.name == "IT Operator")
    with endpoint_roles(fake_studio, "local", [operators.id]):
        before = count(fake_studio)
        # the default, chosen implicitly, is used or refused (never swapped for another one)
        with pytest.raises(PermissionDenied, match="default endpoint 'local' \\(endpoint:use\\)") as refused:
            fake_studio.jobs.submit(actor=designer, mode="txt2img", request=txt2img())
        assert refused.value.field == "endpoint"
        with pytest.raises(NotFound, match="no endpoint named 'local'") as hidden:  # named: they do not even see it
            fake_studio.jobs.submit(actor=designer, mode="txt2img", request=txt2img(), endpoint="local")
        assert hidden.value.field == "endpoint"
        with pytest.raises(gr.Error, match="no endpoint named 'local'"):
            tabs.txt2img.submit(form(tabs, fake_studio), req(designer))
        with http(fake_studio, "alice") as client:
            refused_http = client.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img()})
            assert refused_http.status_code == 403 and refused_http.json()["field"] == "endpoint", refused_http.text
            assert "endpoint:use" in refused_http.json()["detail"]
            assert client.post("/sdapi/v1/txt2img", json=txt2img()).status_code == 403
        assert count(fake_studio) == before
        job = fake_studio.jobs.submit(actor=operator, mode="txt2img", request=txt2img())  # the allowed role
        assert fake_studio.jobs.wait(actor=operator, job_id=job.id, timeout=30).status == JobStatus.SUCCEEDED
    assert fake_studio.jobs.submit(actor=designer, mode="txt2img", request=txt2img()).owner_id == designer.id

    role(fake_studio, "Endpoint lookers", ["inference:list", "inference:create", "endpoint:list", "model:list",
                                           "model:use"])
    looker = member(fake_studio, "eli", "Endpoint lookers")
    before = count(fake_studio)
    for name in ("local", None):
        with pytest.raises(PermissionDenied, match="lacks the permission endpoint:use"):
            fake_studio.jobs.submit(actor=looker, mode="txt2img", request=txt2img(), endpoint=name)
    assert count(fake_studio) == before


def test_every_model_a_job_names_needs_model_use(fake_studio, tabs):
    role(fake_studio, "Lookers", ["inference:list", "inference:create", "endpoint:list", "endpoint:use",
                                  "model:list"])
    looker = member(fake_studio, "lou", "Lookers")
    title = fake_studio.models.checkpoint.title
    before = count(fake_studio)
    with pytest.raises(PermissionDenied, match="model:use") as refused:
        fake_studio.jobs.submit(actor=looker, mode="txt2img", request=txt2img(sd_model_checkpoint=title))
    assert refused.value.field == "sd_model_checkpoint" and "tiny-sd15" in refused.value.message
    with pytest.raises(gr.Error, match="model:use"):
        tabs.txt2img.submit(form(tabs, fake_studio), req(looker))
    with http(fake_studio, "lou") as client:
        answer = client.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img()})
        assert answer.status_code == 403 and "model:use" in answer.json()["detail"], answer.text
    assert count(fake_studio) == before


def test_cancel_interrupt_and_delete_need_update_and_delete(fake_studio, tabs, history):
    role(fake_studio, "Submitters", [*GENERATE_BASICS, "inference:create"])
    sam = member(fake_studio, "sam", "Submitters")
    jobs = fake_studio.jobs
    with parked(fake_studio) as parking:
        job = jobs.submit(actor=sam, mode="txt2img", request=txt2img(), endpoint=parking)
        with pytest.raises(PermissionDenied, match="inference:update"):
            jobs.cancel(actor=sam, job_id=job.id)
        with pytest.raises(PermissionDenied, match="inference:update"):
            jobs.interrupt(actor=sam)
        with pytest.raises(PermissionDenied, match="inference:delete"):
            jobs.delete(actor=sam, job_id=job.id)
        with pytest.raises(gr.Error, match="inference:update"):
            tabs.txt2img.cancel(job.id, req(sam))
        with pytest.raises(gr.Error, match="inference:update"):
            history.cancel(job.id, req(sam))
        with pytest.raises(gr.Error, match="inference:delete"):
            history.delete(job.id, req(sam))
        with http(fake_studio, "sam") as client:
            assert client.post(f"/api/v1/jobs/{job.id}/cancel").status_code == 403
            assert client.delete(f"/api/v1/jobs/{job.id}").status_code == 403
            assert client.post("/sdapi/v1/interrupt").status_code == 403
        assert jobs.get(actor=sam, job_id=job.id).status == JobStatus.QUEUED, "nothing was cancelled or deleted"

        # another user's job: NotFound whatever they hold, through every path
        alice = add_user(fake_studio, "alice")
        for call in (lambda: jobs.cancel(actor=alice, job_id=job.id), lambda: jobs.delete(actor=alice, job_id=job.id)):
            with pytest.raises(NotFound):
                call()
        with pytest.raises(gr.Error, match="no job"):
            history.delete(job.id, req(alice))
        with http(fake_studio, "alice") as client:
            assert client.delete(f"/api/v1/jobs/{job.id}").status_code == 404
            assert client.post(f"/api/v1/jobs/{job.id}/cancel").status_code == 404
        assert jobs.get(actor=sam, job_id=job.id).status == JobStatus.QUEUED

        mine = jobs.submit(actor=alice, mode="txt2img", request=txt2img(), endpoint=parking)  # a Designer may
        assert jobs.cancel(actor=alice, job_id=mine.id).status == JobStatus.CANCELLED
        jobs.delete(actor=alice, job_id=mine.id)
        with pytest.raises(NotFound):
            jobs.get(actor=alice, job_id=mine.id)
