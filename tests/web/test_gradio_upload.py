"""Gradio's upload route (``/ui/gradio_api/upload``): a size limit from the settings, files kept in the
instance's own folder under the data dir, and removed again once they are older than the set age."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_PASSWORD, login

UPLOAD = "/ui/gradio_api/upload"
MAX_AGE_SECONDS = 1.0


@pytest.fixture
def signed_in(make_settings) -> Iterator[tuple[TestClient, Path]]:
    """An administrator's client (lifespan running: Gradio's cleaner too) and the data dir."""
    import app

    settings = make_settings(ui_max_file_mb=1, ui_temp_max_age_hours=MAX_AGE_SECONDS / 3600)
    studio = app.build(settings)
    try:
        with TestClient(studio.app, follow_redirects=False) as client:
            login(client, "admin", ADMIN_PASSWORD)
            yield client, settings.data_dir
    finally:
        studio.close()


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_an_upload_over_the_limit_is_refused_and_leaves_no_file(signed_in):
    client, data_dir = signed_in
    big = client.post(UPLOAD, files={"files": ("big.png", b"\x89PNG" + b"x" * (1024 * 1024 + 1), "image/png")})
    assert big.status_code == 413, big.text
    assert "maximum allowed size" in big.text
    assert _files(data_dir / "tmp" / "gradio") == [], "nothing of the refused upload stays behind"
    small = client.post(UPLOAD, files={"files": ("small.png", b"\x89PNG" + b"y" * 1000, "image/png")})
    assert small.status_code == 200, small.text
    (stored,) = small.json()
    assert Path(stored).is_relative_to(data_dir / "tmp" / "gradio"), f"uploads land under the data dir, not {stored}"
    assert Path(stored).read_bytes().endswith(b"y" * 1000)


def test_uploaded_files_are_deleted_once_older_than_the_set_age(signed_in):
    client, data_dir = signed_in
    answer = client.post(UPLOAD, files={"files": ("old.png", b"\x89PNG" + b"z" * 100, "image/png")})
    assert answer.status_code == 200, answer.text
    (stored,) = answer.json()
    assert Path(stored).is_file()
    deadline = time.monotonic() + 10 * MAX_AGE_SECONDS + 5
    while Path(stored).exists():
        assert time.monotonic() < deadline, "the cleaner never removed the old upload"
        time.sleep(0.1)
    assert _files(data_dir / "tmp" / "gradio") == []


def test_files_left_by_an_earlier_run_are_removed_at_start(make_settings):
    import app

    settings = make_settings()
    leftover = settings.data_dir / "tmp" / "gradio" / "abc" / "left.png"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"from a run that crashed")
    studio = app.build(settings)
    try:
        assert not leftover.exists(), "Gradio's cleaner only knows this run's files: the start clears the rest"
    finally:
        studio.close()
