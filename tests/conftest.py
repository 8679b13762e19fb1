"""Shared fixtures: a temp data dir, settings, a built studio and logged-in HTTP clients."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# OWASP's 19 MiB × 2 passes × 1 lane instead of argon2-cffi's 64 MiB × 3 × 4: about 30 ms a hash instead of
# about 100 ms, for the thousands of hashes and logins the suite makes (servers it starts inherit it).
os.environ.setdefault("STUDIO_PASSWORD_HASH_MEMORY_KIB", "19456")
os.environ.setdefault("STUDIO_PASSWORD_HASH_TIME_COST", "2")
os.environ.setdefault("STUDIO_PASSWORD_HASH_PARALLELISM", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ADMIN_PASSWORD = "admin-password-for-tests"

# ``database_url`` (SQLite and PostgreSQL), ``postgres_url``, ``postgres_server``: see the module.
pytest_plugins = ["tests.fixtures.postgres"]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def make_settings(data_dir: Path):
    from webapp.settings import Settings

    def make(**overrides):
        values = {"data_dir": data_dir, "admin_password": ADMIN_PASSWORD}
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def studio(make_settings):
    import app

    built = app.build(make_settings())
    yield built
    built.close()


@pytest.fixture
def client(studio) -> Iterator:
    """An anonymous client (no session)."""
    from fastapi.testclient import TestClient

    with TestClient(studio.app, follow_redirects=False) as c:
        yield c


def login(client, username: str, password: str):
    response = client.post("/login", data={"username": username, "password": password, "next": "/ui/"})
    assert response.status_code == 303, response.text
    return response


@pytest.fixture
def admin_client(studio) -> Iterator:
    from fastapi.testclient import TestClient

    with TestClient(studio.app, follow_redirects=False) as c:
        login(c, "admin", ADMIN_PASSWORD)
        yield c


CHROMIUM = os.environ.get("STUDIO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium driven by Playwright (``playwright install`` is not used: no downloads).

    Defined once for the whole run: Playwright's sync API cannot nest, so every browser test in every
    folder must share this one instance.
    """
    if not shutil.which(CHROMIUM):
        if os.environ.get("STUDIO_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing but STUDIO_REQUIRE_BROWSER is set")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()
