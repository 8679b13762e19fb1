"""Fixtures for the jobs tests: studios on the fake backend (fast, no torch) or the real local one.

Building a studio costs seconds (argon2, the Gradio app), so each test module shares one fake-backend
studio and every test leaves it empty: ``fake_studio`` deletes all jobs (cancelling running ones)
after the test. Users are created once and reused (``add_user`` is get-or-create).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.conftest import ADMIN_PASSWORD
from tests.fixtures.postgres import empty_database
from tests.fixtures.studio_models import (  # noqa: F401 - fixtures re-exported for this package
    ModelStudio,
    build_model_studio,
    model_studio,
    tiny_model_files,
)

USER_PASSWORD = "user-password-123"
FAKE_OPTIONS = {"step_delay": 0.005, "fail_prompts": {"oom": "OOM-PLEASE", "internal": "CRASH-PLEASE"}}


def add_user(studio: Any, username: str, *, admin: bool = False) -> Any:
    existing = studio.users.get_by_name(username)
    if existing is not None:
        return existing
    actor = studio.users.get_by_name("admin")
    return studio.users.create_user(actor=actor, username=username, password=USER_PASSWORD,
                                    role="admin" if admin else "user")


@contextmanager
def extra_endpoint(studio: Any, name: str, backend: Any) -> Iterator[Any]:
    """``backend`` as the studio's endpoint ``name`` (in service, not the default) with its own dispatcher over the
    studio's queue, for the duration of the block; yields the dispatcher."""
    from webapp.records import EndpointStatus
    from webapp.services.jobs.dispatcher import Dispatcher

    studio.jobs.endpoints.ensure(name=name, kind="scripted", remote=False,
                                 capabilities=backend.capabilities().to_dict(), config={}, is_default=False,
                                 status=EndpointStatus.IN_SERVICE)
    dispatcher = Dispatcher(endpoint=name, backend=backend, queue=studio.jobs.queue, store=studio.store,
                            board=studio.jobs.board)
    studio.jobs.attach(dispatcher)
    try:
        yield dispatcher
    finally:
        studio.jobs.detach(name)
        dispatcher.stop()


def empty_queue(studio: Any) -> None:
    """Delete every job (running ones are cancelled first) and wait until the dispatcher is idle."""
    jobs, admin = studio.jobs, studio.users.get_by_name("admin")
    for job in jobs.list_jobs(actor=admin, all_users=True, limit=None)[0]:
        jobs.delete(actor=admin, job_id=job.id)
    deadline = time.monotonic() + 10
    for dispatcher in jobs._dispatchers.values():
        while dispatcher.in_flight() and time.monotonic() < deadline:
            time.sleep(0.01)


@pytest.fixture(scope="module")
def fake_studio_database() -> str:
    """The database kind of the module's fake studio; a module that overrides this fixture with
    ``params=DATABASE_KINDS`` runs its ``fake_studio`` tests on PostgreSQL as well."""
    return "sqlite"


@pytest.fixture(scope="module")
def shared_fake_studio(request, tmp_path_factory, tiny_model_files,  # noqa: F811
                       fake_studio_database) -> Iterator[ModelStudio]:
    from webapp.settings import Settings

    data_dir = tmp_path_factory.mktemp("fake-studio") / "data"
    kind = fake_studio_database
    database_url = None if kind == "sqlite" else empty_database(request, kind, data_dir)

    def make(**overrides: Any) -> Settings:
        return Settings(data_dir=data_dir, admin_password=ADMIN_PASSWORD, database_url=database_url, **overrides)

    with build_model_studio(make, tiny_model_files, backend="fake", backend_options=FAKE_OPTIONS,
                            max_queued_jobs_per_user=50) as built:
        yield built


@pytest.fixture
def fake_studio(shared_fake_studio) -> Iterator[ModelStudio]:
    """The module's fake-backend studio (tiny models registered), emptied after the test."""
    yield shared_fake_studio
    empty_queue(shared_fake_studio)


def txt2img(**overrides: Any) -> dict[str, Any]:
    request = {"prompt": "a red fox", "steps": 4, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler"}
    request.update(overrides)
    return request
