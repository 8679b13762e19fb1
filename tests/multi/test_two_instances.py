"""Two studio processes behind one load balancer: one database, one asset store, nothing else shared.

Two real ``python app.py`` servers (the fake backend, slow steps) on different ports and data dirs share a
``--database-url`` and a ``--store`` (a SQLite file and a directory; PostgreSQL and an S3 bucket on moto); the test drives them only through their HTTP
APIs with Basic auth, and reads the shared rows to count. It shows that a job submitted to either runs exactly
once, that progress and results are visible from both, that an A1111 interrupt sent to the instance that does not
run the job stops it, and that killing one instance (SIGKILL) mid-job while the other serves loses no job and runs
none twice: the dead instance's running job is requeued when its lease runs out (a short lease here) and finishes
on the survivor; its queued jobs are simply claimed there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import ADMIN_PASSWORD
from tests.fixtures.moto_server import moto_server, s3_bucket, s3_client  # noqa: F401 - fixtures
from tests.fixtures.studio_models import tiny_model_files  # noqa: F401 - fixture
from tests.jobs.conftest import txt2img
from tests.live import free_port

ROOT = Path(__file__).resolve().parents[2]
AUTH = ("admin", ADMIN_PASSWORD)
LEASE_SECONDS = 1.5
STEP_DELAY = 0.05
TERMINAL = {"succeeded", "failed", "cancelled"}


class Instance:
    """One ``python app.py`` process; its log goes to a file, quoted when it fails to start."""

    def __init__(self, name: str, tmp_path: Path, database_url: str, store: str) -> None:
        self.name = name
        self.port = free_port()
        self.log = tmp_path / f"{name}.log"
        env = dict(os.environ, STUDIO_ADMIN_PASSWORD=ADMIN_PASSWORD, STUDIO_BACKEND="fake",
                   STUDIO_BACKEND_OPTIONS=json.dumps({"step_delay": STEP_DELAY}),
                   STUDIO_JOB_LEASE_SECONDS=str(LEASE_SECONDS), STUDIO_JOB_MAX_ATTEMPTS="3", HF_HUB_OFFLINE="1")
        command = [sys.executable, str(ROOT / "app.py"), "--port", str(self.port), "--data-dir",
                   str(tmp_path / name), "--database-url", database_url, "--store", str(store)]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.id = ""

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"{self.name} exited: {self.log.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/login", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{self.name} did not start: {self.log.read_text()[-3000:]}"
            time.sleep(0.1)
        found = re.search(r"studio instance (\S+)", self.log.read_text())
        assert found, "every instance logs its id"
        self.id = found.group(1)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, auth=AUTH, timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, auth=AUTH, timeout=30, **kwargs)

    def submit(self, **request: Any) -> str:
        created = self.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img(**request)})
        assert created.status_code == 201, created.text
        return created.json()["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.get(f"/api/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def until(self, job_id: str, statuses: set[str], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            assert time.monotonic() < deadline, f"job {job_id} stayed {job['status']} (wanted {statuses})"
            time.sleep(0.1)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def shared(request: pytest.FixtureRequest, tmp_path: Path, database_url: str,
           tiny_model_files) -> tuple[str, str]:  # noqa: F811
    """The shared database (with the tiny checkpoint registered, by a build in this process) and store: a
    directory beside SQLite, an S3 bucket (moto; the processes inherit the AWS environment) beside PostgreSQL."""
    import app
    from webapp.settings import Settings

    if database_url.startswith("postgresql"):
        store = f"s3://{request.getfixturevalue('s3_bucket')}/studio"
    else:
        store = str(tmp_path / "store")
    studio = app.build(Settings(data_dir=tmp_path / "setup", database_url=database_url, store=store,
                                admin_password=ADMIN_PASSWORD, backend="fake"))
    try:
        studio.models.register_file(actor=studio.users.get_by_name("admin"), path=tiny_model_files.checkpoint,
                                    declared_type="checkpoint", name="tiny-sd15")
    finally:
        studio.close()
    return database_url, store


@pytest.fixture
def pair(tmp_path: Path, shared: tuple[str, str]) -> Iterator[tuple[Instance, Instance]]:
    database_url, store = shared
    a, b = Instance("a", tmp_path, database_url, store), Instance("b", tmp_path, database_url, store)
    try:
        a.wait_ready()
        b.wait_ready()
        assert a.id != b.id
        yield a, b
    finally:
        a.stop()
        b.stop()


def _rows(database_url: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The shared rows, read as a third party (what the instances recorded, not what they answer)."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, status, attempts, lease_owner, image_keys_json FROM job")).mappings()
            found = {row["id"]: {**row, "status": row["status"].lower()} for row in rows}  # enums stored by name
    finally:
        engine.dispose()
    return {job_id: found[job_id] for job_id in ids}


def _stored_images(store: str, job_id: str) -> list[str]:
    from deploy.storage import open_store

    prefix = f"jobs/{job_id}/"
    return sorted(blob.key.removeprefix(prefix) for blob in open_store(store).list(prefix))


def _exactly_once_and_visible_from_both(a: Instance, b: Instance, database_url: str, store: str) -> None:
    ids = [(a if i % 2 == 0 else b).submit(seed=100 + i, steps=6) for i in range(6)]
    done = [a.until(job_id, TERMINAL) for job_id in ids]
    assert [job["status"] for job in done] == ["succeeded"] * 6
    rows = _rows(database_url, ids)
    assert all(row["attempts"] == 1 for row in rows.values()), "each job was started once"
    assert {row["lease_owner"] for row in rows.values()} <= {a.id, b.id}
    assert all(_stored_images(store, job_id) == ["0.png"] for job_id in ids), "one image each, no duplicates"
    for job_id in ids:  # the same result through either instance
        seen_a, seen_b = a.job(job_id), b.job(job_id)
        assert (seen_a["status"], seen_a["images"]) == (seen_b["status"], seen_b["images"])
        url = seen_a["images"][0]["url"]
        assert a.get(url).content == b.get(url).content and a.get(url).content.startswith(b"\x89PNG")


def _progress_and_interrupt_from_the_other(a: Instance, b: Instance, database_url: str) -> None:
    job_id = a.submit(steps=150, n_iter=3, seed=7)  # 22 s if nothing stops it
    a.until(job_id, {"running"})
    holder_id = _rows(database_url, [job_id])[job_id]["lease_owner"]
    other = b if holder_id == a.id else a
    deadline = time.monotonic() + 20
    while True:  # live progress, from the row the holder writes every second
        progress = other.get(f"/api/v1/jobs/{job_id}/progress", params={"wait": 5}).json()
        if progress["step"] > 0:
            break
        assert time.monotonic() < deadline, f"no progress seen from the other instance: {progress}"
    assert progress["status"] == "running" and (progress["total"], progress["job_count"]) == (150, 3)
    assert other.get("/sdapi/v1/progress").json()["state"]["sampling_steps"] == 150

    # follow it on the other instance's event stream: it must see the end without any wake-up from the holder
    with httpx.stream("GET", f"{other.url}/api/v1/jobs/{job_id}/events", auth=AUTH,
                      timeout=httpx.Timeout(10, read=8)) as stream:
        assert other.post("/sdapi/v1/interrupt").status_code == 200  # A1111's interrupt, sent to the other one
        events = [line for line in stream.iter_lines() if line.startswith("event: ")]
    assert events[-1] == "event: done"
    job = other.job(job_id)
    assert job["status"] == "cancelled" and job["error_kind"] == "cancelled", "the holder's backend stopped it"
    assert len(job["images"]) < 3, "it stopped before its last batch"


def _kill_one_mid_job(a: Instance, b: Instance, database_url: str, store: str) -> None:
    victim_first = [a.submit(seed=300 + i, steps=60) for i in range(3)]  # 3 s each: one runs, two wait
    a.until(victim_first[0], {"running"})
    holder_id = _rows(database_url, [victim_first[0]])[victim_first[0]]["lease_owner"]
    victim, survivor = (a, b) if holder_id == a.id else (b, a)
    more = [survivor.submit(seed=400 + i, steps=10) for i in range(2)]
    ids = victim_first + more
    victim.kill()
    at_kill = _rows(database_url, ids)
    interrupted = {job_id for job_id, row in at_kill.items()
                   if row["status"] == "running" and row["lease_owner"] == victim.id}
    assert interrupted, "the victim was running a job when it died"

    done = [survivor.until(job_id, TERMINAL, timeout=60) for job_id in ids]
    assert [job["status"] for job in done] == ["succeeded"] * len(ids), [job["error"] for job in done]
    rows = _rows(database_url, ids)
    for job_id, row in rows.items():
        expected = 2 if job_id in interrupted else 1  # once before the kill and once after, else once
        assert row["attempts"] == expected, f"job {job_id}: started {row['attempts']} times, expected {expected}"
        assert _stored_images(store, job_id) == ["0.png"] and json.loads(row["image_keys_json"]) == \
            [f"jobs/{job_id}/0.png"]
    assert {rows[job_id]["lease_owner"] for job_id in interrupted} == {survivor.id}
    listed = survivor.get("/api/v1/jobs", params={"limit": 100}).json()
    assert set(ids) <= {j["id"] for j in listed["items"]}
    assert len(listed["items"]) == len({j["id"] for j in listed["items"]}), "nothing listed twice"


def test_two_instances_share_one_queue(pair, shared):
    """Exactly once, visible from both, interrupt from the other instance, then SIGKILL of one mid-job."""
    a, b = pair
    database_url, store = shared
    _exactly_once_and_visible_from_both(a, b, database_url, store)
    _progress_and_interrupt_from_the_other(a, b, database_url)
    _kill_one_mid_job(a, b, database_url, store)
