"""Studios for the API tests: tiny models registered, users alice and bob, a fake or the real local backend.

Module-scoped (a studio with registered models takes seconds to build); tests in one module share
it, so each test uses its own user or restores what it changes.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from tests.conftest import ADMIN_PASSWORD  # noqa: E402
from tests.fixtures.studio_models import ModelStudio, build_model_studio, tiny_model_file_set  # noqa: E402

ALICE_PASSWORD = "alice-password-123"
BOB_PASSWORD = "bob-password-456"
ADMIN = ("admin", ADMIN_PASSWORD)
ALICE = ("alice", ALICE_PASSWORD)
BOB = ("bob", BOB_PASSWORD)


@dataclass
class ApiStudio:
    built: ModelStudio
    client: TestClient

    def __getattr__(self, name: str) -> Any:
        return getattr(self.built, name)

    def user(self, name: str) -> Any:
        return self.built.studio.users.get_by_name(name)


@contextmanager
def api_studio(tmp_path_factory: pytest.TempPathFactory, **overrides: Any) -> Iterator[ApiStudio]:
    """A studio with the tiny models, users alice and bob, and a TestClient (no session)."""
    from webapp.settings import Settings

    data_dir = tmp_path_factory.mktemp("api-studio") / "data"

    def make_settings(**values: Any) -> Settings:
        return Settings(data_dir=data_dir, admin_password=ADMIN_PASSWORD, **values)

    with build_model_studio(make_settings, tiny_model_file_set(), **overrides) as built:
        admin = built.admin
        built.studio.users.create_user(actor=admin, username="alice", password=ALICE_PASSWORD)
        built.studio.users.create_user(actor=admin, username="bob", password=BOB_PASSWORD)
        with TestClient(built.studio.app, follow_redirects=False) as client:
            yield ApiStudio(built=built, client=client)


@pytest.fixture(scope="module")
def fake_studio(tmp_path_factory) -> Iterator[ApiStudio]:
    """Jobs run on the fake backend (instant PNGs): for everything but image content."""
    with api_studio(tmp_path_factory, backend="fake") as s:
        yield s


@pytest.fixture(scope="module")
def slow_studio(tmp_path_factory) -> Iterator[ApiStudio]:
    """The fake backend sleeping 20 ms per step: jobs stay running long enough to watch and interrupt."""
    with api_studio(tmp_path_factory, backend="fake", backend_options={"step_delay": 0.02}) as s:
        yield s


@pytest.fixture(scope="module")
def real_studio(tmp_path_factory) -> Iterator[ApiStudio]:
    """The real local backend on the CPU with the tiny SD1.5 model."""
    import torch

    torch.set_num_threads(2)
    with api_studio(tmp_path_factory) as s:
        yield s
