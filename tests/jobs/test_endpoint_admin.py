"""Administrators deploy and delete endpoints while the server runs (EndpointAdmin): validation naming the
field, secrets encrypted at rest and rebuilt after a restart, deletion that loses no job."""

from __future__ import annotations

import sqlite3
import stat
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import Field, SecretStr

from deploy.backends import options as backend_options
from deploy.backends import registry as backend_registry
from deploy.backends.fake import FakeBackend
from deploy.backends.registry import BackendConfig, backend_kinds
from tests.conftest import ADMIN_PASSWORD
from tests.fixtures.studio_models import build_model_studio, tiny_model_files  # noqa: F401 - fixture
from tests.jobs.conftest import add_user, txt2img
from webapp.records import Endpoint, EndpointStatus, Job, JobStatus
from webapp.services.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from webapp.services.jobs import Deployment, EndpointAdmin
from webapp.services.jobs.endpoint_admin import MASK, shown_config
from webapp.services.secrets import KEY_FILE

SECRET = "correct-horse-battery-staple-42"


def _names(studio: Any) -> list[str]:
    return studio.jobs.endpoints.names()


@pytest.fixture
def deployed(fake_studio) -> Iterator[list[str]]:
    """Names of endpoints a test deployed; deleted afterwards."""
    names: list[str] = []
    yield names
    admin = fake_studio.admin
    for name in names:
        if fake_studio.studio.jobs.endpoints.find(name) is not None:
            fake_studio.studio.endpoint_admin.delete(actor=admin, name=name)


def _deploy(studio: Any, deployed: list[str], **values: Any) -> Endpoint:
    values.setdefault("kind", "fake")
    values.setdefault("options", {})
    endpoint = studio.endpoint_admin.deploy(actor=studio.users.get_by_name("admin"), request=Deployment(**values))
    deployed.append(endpoint.name)
    return endpoint


def test_only_administrators_deploy_and_delete(fake_studio, deployed):
    studio = fake_studio.studio
    alice = add_user(studio, "alice")
    with pytest.raises(PermissionDenied):
        studio.endpoint_admin.deploy(actor=alice, request=Deployment(kind="fake", options={}, name="mine"))
    assert "mine" not in _names(studio)
    endpoint = _deploy(studio, deployed, name="theirs")
    with pytest.raises(PermissionDenied):
        studio.endpoint_admin.delete(actor=alice, name=endpoint.name)
    assert "theirs" in _names(studio)


@pytest.mark.parametrize(("values", "field"), [
    ({"name": "Upper_Case"}, "name"),
    ({"name": "-leading-hyphen"}, "name"),
    ({"name": "x" * 64}, "name"),
    ({"name": 12}, "name"),
    ({"kind": "no-such-kind"}, "kind"),
    ({"options": {"slots": 0}}, "options.slots"),
    ({"options": {"typo": 1}}, "options.typo"),
    ({"options": ["slots"]}, "options"),
    ({"min_instances": -1}, "min_instances"),
    ({"min_instances": 1.5}, "min_instances"),
    ({"max_instances": 0, "min_instances": 0}, "max_instances"),
    ({"min_instances": 3, "max_instances": 2}, "max_instances"),
    ({"max_instances": 101}, "max_instances"),
    ({"autoscale": "yes"}, "autoscale"),
    ({"kind": "http", "options": {"url": "ftp://worker", "secret": SECRET}}, "options.url"),
    ({"kind": "http", "options": {"url": "http://worker:8080", "secret": "short"}}, "options.secret"),
    ({"kind": "http", "options": {"url": "http://worker:8080"}}, "options.secret"),
])
def test_bad_deployments_name_the_field_and_store_nothing(fake_studio, deployed, values, field):
    studio = fake_studio.studio
    before = _names(studio)
    with pytest.raises(InvalidInput) as caught:
        _deploy(studio, deployed, **{"name": "named-here", **values})
    assert caught.value.field == field
    assert _names(studio) == before
    assert not any(n == "named-here" for n in _names(studio))


def test_a_taken_name_is_a_conflict_and_a_missing_name_is_generated(fake_studio, deployed):
    studio = fake_studio.studio
    with pytest.raises(Conflict) as caught:
        _deploy(studio, deployed, name="local")
    assert caught.value.field == "name"
    generated = _deploy(studio, deployed)
    assert generated.name.startswith("studio-fake-") and len(generated.name) == len("studio-fake-") + 6


def test_fake_is_deployable_only_on_a_server_configured_with_it(fake_studio):
    kinds = fake_studio.studio.endpoint_admin.kinds()
    assert "fake" in kinds and "local" in kinds and "http" in kinds
    production = EndpointAdmin(endpoints=None, fleet=None, jobs=None, queue=None, secrets=None,  # type: ignore[arg-type]
                               configured_backend="local")
    assert "fake" not in production.kinds() and "local" in production.kinds()
    with pytest.raises(InvalidInput) as caught:
        production.deploy(actor=fake_studio.admin, request=Deployment(kind="fake", options={}))
    assert caught.value.field == "kind"


def test_a_deployed_endpoint_runs_jobs_at_once_with_its_bounds_recorded(fake_studio, deployed):
    studio, admin = fake_studio.studio, fake_studio.admin
    endpoint = _deploy(studio, deployed, name="burst", options={"slots": 2, "remote": True}, min_instances=0,
                       max_instances=4, autoscale=True)
    assert endpoint.status == EndpointStatus.IN_SERVICE and endpoint.remote
    assert (endpoint.min_instances, endpoint.max_instances, endpoint.autoscale) == (0, 4, True)
    assert endpoint.capabilities["slots"] == 2
    job = studio.jobs.submit(actor=add_user(studio, "alice"), mode="txt2img", request=txt2img(), endpoint="burst")
    done = studio.jobs.wait(actor=admin, job_id=job.id, timeout=30)
    assert done.status == JobStatus.SUCCEEDED and done.worker.startswith("burst/")


def test_a_local_endpoint_keeps_its_own_devices_and_the_servers_skeletons(fake_studio, deployed):
    studio = fake_studio.studio
    endpoint = _deploy(studio, deployed, name="second-gpu", kind="local", options={"devices": "cpu", "cache_gb": 0.5})
    assert endpoint.status == EndpointStatus.IN_SERVICE and endpoint.config == {"devices": "cpu", "cache_gb": 0.5}
    backend = studio.jobs.backend("second-gpu")
    assert backend.devices == ["cpu"] and backend.cache_bytes == 512 * 1024**2
    assert [str(d) for d in backend.skeleton_dirs] == [str(d) for d in studio.settings.skeleton_dirs] != []


def test_a_kind_without_a_backend_on_this_server_ends_failed_with_the_reason(fake_studio, deployed):
    studio = fake_studio.studio
    endpoint = _deploy(studio, deployed, name="worker-1", kind="http",
                       options={"url": "http://127.0.0.1:9", "secret": SECRET})
    assert endpoint.kind == "http"
    if "http" not in backend_kinds():  # the http backend lands on another branch
        assert endpoint.status == EndpointStatus.FAILED and "unknown backend kind 'http'" in endpoint.error
    assert SECRET not in (endpoint.error or "") and SECRET not in endpoint.config_json
    assert shown_config(endpoint)["secret"] == MASK and shown_config(endpoint)["url"] == "http://127.0.0.1:9"


def _wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert predicate()


def test_deleting_an_endpoint_requeues_its_running_job_and_moves_its_queue_to_the_default(fake_studio, deployed):
    studio, admin = fake_studio.studio, fake_studio.admin
    jobs = studio.jobs
    _deploy(studio, deployed, name="doomed", options={"steps": 400, "step_delay": 0.05})
    running = jobs.submit(actor=admin, mode="txt2img", request=txt2img(seed=1), endpoint="doomed")
    waiting = jobs.submit(actor=admin, mode="txt2img", request=txt2img(seed=2), endpoint="doomed")
    _wait_until(lambda: jobs.get(actor=admin, job_id=running.id).status == JobStatus.RUNNING)
    assert jobs.get(actor=admin, job_id=waiting.id).status == JobStatus.QUEUED

    assert studio.endpoint_admin.delete(actor=admin, name="doomed") == 2
    assert "doomed" not in _names(studio)
    with pytest.raises(NotFound):
        jobs.submit(actor=admin, mode="txt2img", request=txt2img(), endpoint="doomed")
    for job_id in (running.id, waiting.id):
        done = jobs.wait(actor=admin, job_id=job_id, timeout=30)
        assert done.status == JobStatus.SUCCEEDED and done.endpoint == "local" and done.worker.startswith("local/")
    assert jobs.get(actor=admin, job_id=running.id).attempts == 1  # the interrupted run was not charged


def test_the_default_endpoint_cannot_be_deleted_and_unknown_ones_are_not_found(fake_studio):
    studio, admin = fake_studio.studio, fake_studio.admin
    with pytest.raises(Conflict) as caught:
        studio.endpoint_admin.delete(actor=admin, name="local")
    assert caught.value.field == "name"
    with pytest.raises(NotFound):
        studio.endpoint_admin.delete(actor=admin, name="nowhere")
    assert studio.jobs.endpoints.get(actor=admin, name="local").status == EndpointStatus.IN_SERVICE


def test_a_deletion_interrupted_by_a_stop_is_finished_at_the_next_start(fake_studio, deployed):
    studio, admin = fake_studio.studio, fake_studio.admin
    _deploy(studio, deployed, name="halfway")
    studio.fleet.stop_endpoint("halfway")
    studio.jobs.endpoints.set_status("halfway", EndpointStatus.DELETING)
    job = studio.jobs.queue.enqueue(Job(owner_id=admin.id, owner_name="admin", mode="txt2img", endpoint="halfway",
                                        request_json='{"prompt": "x", "steps": 2, "width": 64, "height": 64}'))
    studio.endpoint_admin.resume()
    assert "halfway" not in _names(studio)
    assert studio.jobs.get(actor=admin, job_id=job.id).endpoint == "local"


# -- secrets at rest -------------------------------------------------------------------------------------------
class VaultOptions(backend_options.BackendOptions):
    token: SecretStr = Field(...)
    slots: int = Field(1, ge=1)


RECEIVED: list[str] = []


def _vault_backend(config: BackendConfig) -> FakeBackend:
    parsed = backend_options.parse_options("vault", config.options)
    RECEIVED.append(parsed.token.get_secret_value())  # type: ignore[attr-defined]
    return FakeBackend(config.name, slots=parsed.slots)  # type: ignore[attr-defined]


@pytest.fixture
def vault_kind(monkeypatch) -> None:
    """A kind with a secret option, registered for one test."""
    monkeypatch.setitem(backend_options._MODELS, "vault", VaultOptions)
    monkeypatch.setitem(backend_registry._FACTORIES, "vault", _vault_backend)
    RECEIVED.clear()


def test_secrets_are_encrypted_at_rest_and_rebuilt_after_a_restart(tmp_path, tiny_model_files, vault_kind):  # noqa: F811
    from webapp.settings import Settings

    data_dir = tmp_path / "data"

    def make(**overrides: Any) -> Settings:
        return Settings(data_dir=data_dir, admin_password=ADMIN_PASSWORD, **overrides)

    with build_model_studio(make, tiny_model_files, backend="fake") as first:
        endpoint = first.studio.endpoint_admin.deploy(
            actor=first.admin, request=Deployment(name="vaulted", kind="vault", options={"token": SECRET, "slots": 2}))
        assert endpoint.status == EndpointStatus.IN_SERVICE and RECEIVED == [SECRET]
        assert shown_config(endpoint) == {"token": MASK, "slots": 2}

    key_file = data_dir / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    raw = sqlite3.connect(data_dir / "studio.db")
    row = raw.execute("SELECT * FROM endpoint WHERE name = 'vaulted'").fetchone()
    raw.close()
    assert row is not None and not any(SECRET in str(value) for value in row)
    assert SECRET.encode() not in (data_dir / "studio.db").read_bytes()

    with build_model_studio(make, tiny_model_files, backend="fake") as again:
        assert RECEIVED == [SECRET, SECRET]
        assert again.studio.jobs.endpoints.get(actor=again.admin, name="vaulted").status == EndpointStatus.IN_SERVICE
        job = again.studio.jobs.submit(actor=again.admin, mode="txt2img", request=txt2img(), endpoint="vaulted")
        assert again.studio.jobs.wait(actor=again.admin, job_id=job.id, timeout=30).status == JobStatus.SUCCEEDED

    key_file.write_bytes(b"6hKdIdTbFTOW6DzZ3ggBvTbjY2dMWLdhQA8r-2Vv2Zg=")  # another valid key: the token cannot open
    with build_model_studio(make, tiny_model_files, backend="fake") as replaced:
        broken = replaced.studio.jobs.endpoints.get(actor=replaced.admin, name="vaulted")
        assert broken.status == EndpointStatus.FAILED and "cannot be decrypted" in broken.error
        assert RECEIVED == [SECRET, SECRET]


def test_endpoints_recorded_before_version_8_read_with_one_instance_and_no_secrets(tmp_path):
    from sqlalchemy import text

    from webapp import schema
    from webapp.db import Database

    db = Database(f"sqlite:///{tmp_path / 'v7.db'}")
    try:
        schema.upgrade(db, target=7)
        with db.write() as s:  # the endpoint table as version 7 made it (today's v4 creates the newer one)
            for column in ("min_instances", "max_instances", "autoscale", "secrets_token", "allowed_roles"):
                s.connection().execute(text(f'ALTER TABLE endpoint DROP COLUMN "{column}"'))
            s.connection().execute(text(
                "INSERT INTO endpoint (name, kind, status, remote, is_default, config_json, capabilities_json, "
                "created_at, updated_at) VALUES ('older', 'fake', 'IN_SERVICE', 0, 0, '{}', '{}', "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00')"))
        assert schema.upgrade(db) >= 8
        with db.read() as s:
            row = s.get(Endpoint, "older")
            assert (row.min_instances, row.max_instances, row.autoscale, row.secrets_token) == (1, 1, False, None)
            assert row.allowed_roles == ""  # v17: open to every user of endpoints
    finally:
        db.dispose()
