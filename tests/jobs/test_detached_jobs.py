"""Jobs that run elsewhere (a SageMaker async invocation) survive a restart of the studio: the backend's handle is
on the row before its ``submit`` returns, a stopping server leaves the job running, and the next start hands it
back to the backend (``adopt``) instead of running it twice. A backend that cannot adopt gets the job again."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from PIL import Image
from sqlalchemy import update

from deploy.backends.base import Backend, Capabilities, EventSink
from deploy.backends.messages import JobSpec, Progress, Started, Succeeded
from tests.jobs.conftest import add_user, txt2img
from webapp.records import EndpointStatus, Job, JobStatus, utcnow
from webapp.services.jobs.dispatcher import WAITING_PHASE, Dispatcher
from webapp.ui.job_views import progress_html


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


class CloudBackend(Backend):
    """Jobs "run in the cloud": ``submit`` reports a handle and returns; the test finishes them with ``finish``."""

    kind = "cloud-test"

    def __init__(self, name: str, *, adopts: bool, read_row: Any = None) -> None:
        super().__init__(name)
        self.adopts = adopts  # type: ignore[misc] - per instance in this test
        self.read_row = read_row
        self.sink: EventSink | None = None
        self.held: dict[str, Mapping[str, Any]] = {}
        self.adopted: list[tuple[str, dict[str, Any]]] = []
        self.seen_at_submit: dict[str, Any] = {}
        self.submitted = threading.Event()

    def is_configured(self) -> bool:
        return True

    def capabilities(self) -> Capabilities:
        return Capabilities(slots=4, remote=True)

    def start(self, sink: EventSink) -> None:
        self.sink = sink

    def free_slots(self) -> int:
        return 4 - len(self.held)

    def submit(self, spec: JobSpec) -> None:
        handle = {"inference_id": f"inf-{spec.job_id}", "output": f"s3://bucket/out/{spec.job_id}.out"}
        self.held[spec.job_id] = handle
        assert self.sink is not None
        self.sink(Started(job_id=spec.job_id, worker="cloud-instance", handle=handle))
        if self.read_row is not None:  # what the database says before submit returns
            self.seen_at_submit[spec.job_id] = self.read_row(spec.job_id).remote_handle
        self.submitted.set()

    def adopt(self, spec: JobSpec, handle: Mapping[str, Any]) -> bool:
        if not self.adopts:
            return False
        self.adopted.append((spec.job_id, dict(handle)))
        self.held[spec.job_id] = handle
        return True

    def finish(self, job_id: str) -> None:
        self.held.pop(job_id)
        assert self.sink is not None
        self.sink(Succeeded(job_id=job_id, images=(_png(),), infotexts=("a red fox",), seeds=(7,)))

    def cancel(self, job_id: str) -> bool:
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Held jobs go on in the cloud: nothing to report."""


def _attach(studio: Any, backend: Backend) -> Dispatcher:
    studio.jobs.endpoints.ensure(name=backend.name, kind=backend.kind, remote=True,
                                 capabilities=backend.capabilities().to_dict(), config={}, is_default=False,
                                 status=EndpointStatus.IN_SERVICE)
    dispatcher = Dispatcher(endpoint=backend.name, backend=backend, queue=studio.jobs.queue, store=studio.store,
                            board=studio.jobs.board)
    studio.jobs.attach(dispatcher)  # the service runs: started at once (adopting what was left running)
    return dispatcher


def _row(studio: Any, job_id: str) -> Job:
    with studio.db.read() as s:
        return s.get(Job, job_id)


def _wait_status(studio: Any, job_id: str, status: JobStatus, timeout: float = 10.0) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        row = _row(studio, job_id)
        if row.status == status or time.monotonic() > deadline:
            return row
        time.sleep(0.02)


def _submit_and_stop(studio: Any, name: str) -> tuple[str, dict[str, Any]]:
    """Run a job on a fresh ``name`` endpoint, then stop it as a stopping server does."""
    actor = add_user(studio, "detached-user")
    first = CloudBackend(name, adopts=True, read_row=lambda job_id: _row(studio, job_id))
    dispatcher = _attach(studio, first)
    job = studio.jobs.submit(actor=actor, mode="txt2img", request=txt2img(), endpoint=name)
    assert first.submitted.wait(10)
    handle = first.held[job.id]
    assert first.seen_at_submit[job.id] == handle  # recorded before submit returned
    studio.jobs.detach(name)
    dispatcher.stop(keep_detached=True)
    row = _row(studio, job.id)
    assert row.status == JobStatus.RUNNING and row.remote_handle == handle
    return job.id, dict(handle)


def test_a_job_running_elsewhere_is_adopted_after_a_restart_and_finishes_once(fake_studio):
    job_id, handle = _submit_and_stop(fake_studio, "cloud-adopts")
    recovery = fake_studio.jobs.queue.recover(endpoints=["cloud-adopts"], adopting=["cloud-adopts"])
    assert job_id not in recovery.requeued and _row(fake_studio, job_id).status == JobStatus.RUNNING

    second = CloudBackend("cloud-adopts", adopts=True)
    dispatcher = _attach(fake_studio, second)
    try:
        assert second.adopted == [(job_id, handle)]
        assert not second.submitted.is_set()  # taken over, not run again
        second.finish(job_id)
        done = _wait_status(fake_studio, job_id, JobStatus.SUCCEEDED)
        assert done.status == JobStatus.SUCCEEDED and len(done.image_keys) == 1 and done.attempts == 1
        assert fake_studio.store.stat(done.image_keys[0]) is not None
    finally:
        fake_studio.jobs.detach("cloud-adopts")
        dispatcher.stop()


def test_a_backend_that_cannot_adopt_gets_the_job_again(fake_studio):
    job_id, _ = _submit_and_stop(fake_studio, "cloud-forgets")
    second = CloudBackend("cloud-forgets", adopts=False)
    dispatcher = _attach(fake_studio, second)
    try:
        assert second.submitted.wait(10)  # requeued, then claimed and submitted afresh
        assert second.adopted == [] and job_id in second.held
        second.finish(job_id)
        assert _wait_status(fake_studio, job_id, JobStatus.SUCCEEDED).status == JobStatus.SUCCEEDED
    finally:
        fake_studio.jobs.detach("cloud-forgets")
        dispatcher.stop()


def test_recovery_requeues_a_handled_job_when_its_endpoint_cannot_adopt_and_cancels_a_cancelled_one(fake_studio):
    job_id, _ = _submit_and_stop(fake_studio, "cloud-gone")
    recovery = fake_studio.jobs.queue.recover(endpoints=["cloud-gone"], adopting=[])
    assert recovery.requeued == (job_id,)
    row = _row(fake_studio, job_id)
    assert row.status == JobStatus.QUEUED and row.remote_handle is None  # a requeued job has no handle
    fake_studio.jobs.queue.cancel_queued(job_id)

    cancelled_id, _ = _submit_and_stop(fake_studio, "cloud-cancelled")
    assert fake_studio.jobs.queue.request_cancel(cancelled_id)
    recovery = fake_studio.jobs.queue.recover(endpoints=["cloud-cancelled"], adopting=["cloud-cancelled"])
    assert recovery.cancelled == (cancelled_id,)
    assert _row(fake_studio, cancelled_id).status == JobStatus.CANCELLED


def test_removing_the_endpoint_requeues_its_jobs_running_elsewhere(fake_studio):
    actor = add_user(fake_studio, "detached-user")
    backend = CloudBackend("cloud-removed", adopts=True)
    dispatcher = _attach(fake_studio, backend)
    job = fake_studio.jobs.submit(actor=actor, mode="txt2img", request=txt2img(), endpoint="cloud-removed")
    assert backend.submitted.wait(10)
    fake_studio.jobs.detach("cloud-removed")
    dispatcher.stop()  # the endpoint goes away: its results will never be collected here
    row = _row(fake_studio, job.id)
    assert row.status == JobStatus.QUEUED and row.remote_handle is None and row.attempts == 0
    fake_studio.jobs.queue.cancel_queued(job.id)


def test_a_worker_cannot_claim_or_delete_another_jobs_files(fake_studio):
    """A remote worker answers store keys; keys outside the job's own ``jobs/<id>/`` are ignored, so deleting the
    job cannot delete another job's files."""
    actor = add_user(fake_studio, "detached-user")
    victim = fake_studio.store.put("jobs/someone-else/0.png", io.BytesIO(_png()), content_type="image/png")
    backend = CloudBackend("cloud-liar", adopts=True)
    dispatcher = _attach(fake_studio, backend)
    try:
        job = fake_studio.jobs.submit(actor=actor, mode="txt2img", request=txt2img(), endpoint="cloud-liar")
        assert backend.submitted.wait(10)
        own = f"jobs/{job.id}/0.png"
        fake_studio.store.put(own, io.BytesIO(_png()), content_type="image/png")
        backend.held.pop(job.id)
        backend.sink(Succeeded(job_id=job.id, image_keys=(own, victim.key, f"jobs/{job.id}/../someone-else/0.png"),
                               artifact_keys=("jobs/someone-else/0.png",)))
        done = _wait_status(fake_studio, job.id, JobStatus.SUCCEEDED)
        assert done.image_keys == [own] and done.artifact_keys == []
        fake_studio.jobs.delete(actor=actor, job_id=job.id)
        assert fake_studio.store.stat("jobs/someone-else/0.png") is not None
    finally:
        fake_studio.jobs.detach("cloud-liar")
        dispatcher.stop()
        fake_studio.store.delete("jobs/someone-else/0.png")


def test_a_waiting_note_reaches_the_progress_the_ui_and_a1111_show(fake_studio):
    actor = add_user(fake_studio, "detached-user")
    backend = CloudBackend("cloud-cold", adopts=True)
    dispatcher = _attach(fake_studio, backend)
    try:
        job = fake_studio.jobs.submit(actor=actor, mode="txt2img", request=txt2img(), endpoint="cloud-cold")
        assert backend.submitted.wait(10)
        note = "endpoint cloud-cold is scaling from zero: waited 1m 05s so far (a cold start takes minutes)"
        backend.sink(Progress(job_id=job.id, step=0, total=0, phase=WAITING_PHASE, log=(note,)))
        deadline = time.monotonic() + 10
        while fake_studio.jobs.snapshot_of(_row(fake_studio, job.id)).note != note:
            assert time.monotonic() < deadline, "the note never reached the snapshot"
            time.sleep(0.02)
        assert "scaling from zero" in progress_html(fake_studio.jobs.snapshot_of(_row(fake_studio, job.id)))
        backend.finish(job.id)
        assert _wait_status(fake_studio, job.id, JobStatus.SUCCEEDED).status == JobStatus.SUCCEEDED
    finally:
        fake_studio.jobs.detach("cloud-cold")
        dispatcher.stop()


def test_a_job_running_elsewhere_whose_instance_died_is_adopted_by_the_reaper_not_before(fake_studio):
    """Another studio instance on the same database ran the job and died: while its lease is good nobody takes
    the job; once it ran out, this instance's reaper takes the lease and its adopting dispatcher takes the job
    over (not run again)."""
    job_id, handle = _submit_and_stop(fake_studio, "cloud-orphaned")
    other = "0123456789ab.0123456789ab"  # an instance of another installation

    def lease(expires_in: float) -> None:
        with fake_studio.db.write() as s:
            s.exec(update(Job).where(Job.id == job_id).values(
                lease_owner=other, lease_expires_at=utcnow() + timedelta(seconds=expires_in)))

    lease(60)
    backend = CloudBackend("cloud-orphaned", adopts=True)
    dispatcher = _attach(fake_studio, backend)
    try:
        assert fake_studio.jobs.reap().changed == () and backend.adopted == []  # the other instance is alive
        lease(-1)
        fake_studio.jobs.reap()  # (or its own thread's tick, whichever comes first: the lease is taken once)
        assert backend.adopted == [(job_id, handle)] and not backend.submitted.is_set()
        assert _row(fake_studio, job_id).lease_owner == fake_studio.jobs.queue.instance.id
        backend.finish(job_id)
        done = _wait_status(fake_studio, job_id, JobStatus.SUCCEEDED)
        assert done.status == JobStatus.SUCCEEDED and done.attempts == 1 and len(done.image_keys) == 1
    finally:
        fake_studio.jobs.detach("cloud-orphaned")
        dispatcher.stop()
