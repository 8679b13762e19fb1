"""Trainings go through the one authorisation rule on every path (service, Training tab handlers, HTTP):
creating needs ``training:create``, ``model:use`` on the base checkpoint, ``dataset:use`` on the dataset and
``endpoint:use`` on the endpoint; stopping ``training:update``; deleting ``training:delete``; and the role quotas
on jobs apply. A refused call leaves no job and changes none."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pytest

from tests.jobs.test_job_access import endpoint_roles, member, role
from tests.trainings.conftest import ENDPOINT, dataset_of, http_as, job_count, user
from webapp.records import JobStatus
from webapp.services.errors import JobQuotaExceeded, NotFound, PermissionDenied
from webapp.ui.context import UiContext
from webapp.ui.training_tab import TrainingTab

BASE = "/api/v1/trainings"
AROUND = ["endpoint:list", "endpoint:use", "model:list", "model:use", "dataset:list", "dataset:create", "dataset:use",
          "training:list"]


def _values(tstudio: Any, actor: Any, **overrides: Any) -> dict[str, Any]:
    values = {"base_type": "sd15", "base_model": "tiny-sd15", "dataset_id": dataset_of(tstudio, actor).id,
              "config": "network_dim = 4\nmax_train_epochs = 2\n", "output_name": "guarded", "endpoint": ENDPOINT}
    values.update(overrides)
    return values


def _tab(tstudio: Any) -> TrainingTab:
    return TrainingTab(UiContext(users=tstudio.users), tstudio.trainings, tstudio.datasets)


def _refused_everywhere(tstudio: Any, actor: Any, permission: str, field: str | None = None) -> None:
    """``actor``'s training is refused naming ``permission`` by the service, the tab and HTTP; no job is left."""
    before = job_count(tstudio)
    values = _values(tstudio, actor)
    with pytest.raises(PermissionDenied, match=permission) as refused:
        tstudio.trainings.create(actor=actor, **values)
    if field is not None:
        assert refused.value.field == field
    with pytest.raises(gr.Error, match=permission):
        _tab(tstudio).create_training(values["base_type"], tstudio.models.checkpoint.id, values["dataset_id"],
                                      values["config"], values["output_name"], ENDPOINT,
                                      gr.Request(username=actor.username))
    answer = http_as(tstudio, actor.username).post(BASE, json=values)
    assert answer.status_code == 403 and permission in answer.json()["detail"], answer.text
    assert job_count(tstudio) == before, "a refused training leaves no job"


def test_creating_a_training_needs_training_create(tstudio):
    role(tstudio, "No training", AROUND)
    _refused_everywhere(tstudio, member(tstudio, "gil", "No training"), "training:create")
    job = tstudio.trainings.create(actor=user(tstudio, "alice"), **_values(tstudio, user(tstudio, "alice")))
    assert job.status == JobStatus.QUEUED, "a Designer trains"


def test_the_dataset_needs_dataset_use_and_the_base_model_model_use(tstudio):
    role(tstudio, "Dataset lookers", [*[p for p in AROUND if p != "dataset:use"], "training:create"])
    _refused_everywhere(tstudio, member(tstudio, "dot", "Dataset lookers"), "dataset:use", "dataset_id")
    role(tstudio, "Model lookers", [*[p for p in AROUND if p != "model:use"], "training:create"])
    _refused_everywhere(tstudio, member(tstudio, "mo", "Model lookers"), "model:use", "base_model")


def test_the_endpoint_needs_endpoint_use(tstudio):
    alice = user(tstudio, "alice")
    admins = next(r for r in tstudio.roles.list_roles(actor=tstudio.admin) if r.name == "Admin")
    before = job_count(tstudio)
    with endpoint_roles(tstudio, ENDPOINT, [admins.id]):
        with pytest.raises(NotFound, match=ENDPOINT):  # reserved for other roles: Designers do not even see it
            tstudio.trainings.create(actor=alice, **_values(tstudio, alice))
        assert http_as(tstudio, "alice").post(BASE, json=_values(tstudio, alice)).status_code == 404
        assert job_count(tstudio) == before
        assert tstudio.trainings.create(actor=tstudio.admin, **_values(tstudio, tstudio.admin)).endpoint == ENDPOINT


def test_stop_and_delete_need_training_update_and_delete(tstudio):
    role(tstudio, "Trainers without control", [*AROUND, "training:create"])
    tess = member(tstudio, "tess", "Trainers without control")
    job = tstudio.trainings.create(actor=tess, **_values(tstudio, tess))
    tab, as_tess = _tab(tstudio), gr.Request(username="tess")
    with pytest.raises(PermissionDenied, match="training:update"):
        tstudio.trainings.stop(actor=tess, job_id=job.id)
    with pytest.raises(PermissionDenied, match="training:delete"):
        tstudio.trainings.delete(actor=tess, job_id=job.id)
    with pytest.raises(gr.Error, match="training:update"):
        tab.stop_training(job.id, as_tess)
    with pytest.raises(gr.Error, match="training:delete"):
        tab.delete_training(job.id, as_tess)
    client = http_as(tstudio, "tess")
    assert client.post(f"{BASE}/{job.id}/stop").status_code == 403
    assert client.delete(f"{BASE}/{job.id}").status_code == 403
    other = http_as(tstudio, "alice")  # another user's training: 404, not 403
    assert other.post(f"{BASE}/{job.id}/stop").status_code == 404
    assert other.delete(f"{BASE}/{job.id}").status_code == 404
    with pytest.raises(gr.Error, match="no job"):
        tab.delete_training(job.id, gr.Request(username="alice"))
    kept = tstudio.trainings.get(actor=tess, job_id=job.id)  # (the fleet may have let the trainers run it)
    assert not kept.cancel_requested and kept.status != JobStatus.CANCELLED, "nothing was stopped or deleted"


def test_role_quotas_apply_to_trainings(tstudio):
    found = role(tstudio, "One training at a time", [*AROUND, "training:create"])
    tstudio.roles.update_role(actor=tstudio.admin, role=found.id, max_queued_jobs=1)
    tina = member(tstudio, "tina", "One training at a time")
    tstudio.trainings.create(actor=tina, **_values(tstudio, tina))
    before = job_count(tstudio)
    with pytest.raises(JobQuotaExceeded, match="1 of 1") as refused:
        tstudio.trainings.create(actor=tina, **_values(tstudio, tina))
    assert refused.value.field == "max_queued_jobs"
    answer = http_as(tstudio, "tina").post(BASE, json=_values(tstudio, tina))
    assert answer.status_code == 429 and answer.json()["field"] == "max_queued_jobs", answer.text
    assert job_count(tstudio) == before
