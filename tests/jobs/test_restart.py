"""Restart safety with a real server process killed by SIGKILL mid-job.

``python app.py`` runs as a subprocess on a temp data dir (and SQLite, or PostgreSQL) with the fake backend (slow steps, so there
is time to kill it while the job runs). After the kill, a restart requeues the job and it completes;
a job that is running every time the server dies is given up after ``job_max_attempts`` starts and
ends ``failed`` with the reason. Nothing stays ``running``, nothing is lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_PASSWORD
from tests.jobs.conftest import txt2img
from tests.live import free_port

ROOT = Path(__file__).resolve().parents[2]
AUTH = ("admin", ADMIN_PASSWORD)


@pytest.fixture
def data_dir_with_model(tmp_path, tiny_model_files, database_url) -> Path:
    """A data dir whose registry holds the tiny checkpoint (registered by a build in this process); the
    database is ``database_url``'s (SQLite, or PostgreSQL, which the servers are then pointed at)."""
    import app
    from webapp.settings import Settings

    data_dir = tmp_path / "data"
    on_postgres = not database_url.startswith("sqlite")  # SQLite: the data dir's own studio.db
    if on_postgres:
        (tmp_path / "database_url").write_text(database_url)
    studio = app.build(Settings(data_dir=data_dir, admin_password=ADMIN_PASSWORD, backend="fake",
                                database_url=database_url if on_postgres else None))
    try:
        studio.models.register_file(actor=studio.users.get_by_name("admin"), path=tiny_model_files.checkpoint,
                                    declared_type="checkpoint", name="tiny-sd15")
    finally:
        studio.close()
    return data_dir


@contextmanager
def server(data_dir: Path, log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    env = dict(os.environ, STUDIO_ADMIN_PASSWORD=ADMIN_PASSWORD, STUDIO_BACKEND="fake",
               STUDIO_BACKEND_OPTIONS=json.dumps({"step_delay": 0.05}), STUDIO_JOB_MAX_ATTEMPTS="2",
               HF_HUB_OFFLINE="1")
    database_url = data_dir.parent / "database_url"
    if database_url.exists():
        env["STUDIO_DATABASE_URL"] = database_url.read_text()
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--data-dir",
                                 str(data_dir)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}: {log.read_text()[-2000:]}"
            try:
                if httpx.get(base + "/login", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def _job(base: str, job_id: str) -> dict:
    response = httpx.get(f"{base}/api/v1/jobs/{job_id}", auth=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def _until(base: str, job_id: str, statuses: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = _job(base, job_id)
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job stayed {job['status']}"
        time.sleep(0.1)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def test_a_job_killed_mid_run_is_requeued_and_completes(data_dir_with_model, tmp_path):
    log = tmp_path / "server.log"
    with server(data_dir_with_model, log) as (base, proc):
        created = httpx.post(f"{base}/api/v1/jobs", auth=AUTH, timeout=30,
                             json={"mode": "txt2img", "request": txt2img(steps=60)})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        _until(base, job_id, {"running"})
        _kill(proc)
    with server(data_dir_with_model, log) as (base, _proc):
        job = _until(base, job_id, {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 2, "started once before the kill, once after"
        image = httpx.get(f"{base}{job['images'][0]['url']}", auth=AUTH, timeout=10)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        listed = httpx.get(f"{base}/api/v1/jobs", auth=AUTH, timeout=10).json()
        assert [j["id"] for j in listed["items"]] == [job_id], "nothing lost, nothing duplicated"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # three server starts: SQLite only
def test_a_job_running_at_every_crash_fails_after_the_attempt_limit(data_dir_with_model, tmp_path):
    log = tmp_path / "server.log"
    with server(data_dir_with_model, log) as (base, proc):
        created = httpx.post(f"{base}/api/v1/jobs", auth=AUTH, timeout=30,
                             json={"mode": "txt2img", "request": txt2img(steps=150, n_iter=100)})
        job_id = created.json()["id"]
        _until(base, job_id, {"running"})
        _kill(proc)
    with server(data_dir_with_model, log) as (base, proc):
        assert _until(base, job_id, {"running"})["attempts"] == 2
        _kill(proc)
    with server(data_dir_with_model, log) as (base, _proc):
        job = _job(base, job_id)
        assert job["status"] == "failed" and job["error_kind"] == "interrupted"
        assert "started 2 times" in job["error"] and "limit is 2" in job["error"]
