"""Fixtures for the jobs tests: studios on the fake backend (fast, no torch) or the real local one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures.studio_models import (  # noqa: F401 - fixtures re-exported for this package
    ModelStudio,
    build_model_studio,
    model_studio,
    tiny_model_files,
)

USER_PASSWORD = "user-password-123"


def add_user(studio: Any, username: str, *, admin: bool = False) -> Any:
    actor = studio.users.get_by_name("admin")
    return studio.users.create_user(actor=actor, username=username, password=USER_PASSWORD,
                                    role="admin" if admin else "user")


@pytest.fixture
def fake_options() -> dict[str, Any]:
    """Override in a test module to change the fake backend (delays, failures, slots)."""
    return {"step_delay": 0.0, "fail_prompts": {"oom": "OOM-PLEASE", "internal": "CRASH-PLEASE"}}


@pytest.fixture
def fake_studio(make_settings, tiny_model_files, fake_options) -> Iterator[ModelStudio]:  # noqa: F811
    """A studio whose ``local`` endpoint runs the fake backend, with the tiny models registered."""
    with build_model_studio(make_settings, tiny_model_files, backend="fake", backend_options=fake_options,
                            max_queued_jobs_per_user=5) as built:
        yield built


def txt2img(**overrides: Any) -> dict[str, Any]:
    request = {"prompt": "a red fox", "steps": 4, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler"}
    request.update(overrides)
    return request
