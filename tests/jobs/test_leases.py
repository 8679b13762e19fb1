"""Job leases: two studio instances (two queues with their own ``Instance``) on one database (SQLite, PostgreSQL).

A running job belongs to the instance whose lease it carries: another instance's start or reaper never takes it
while the lease is good, takes it (requeue, fail past the attempt limit, cancel, or adopt a job with a remote
handle) once it ran out, and the old holder can no longer finish it. Leases run out here by moving
``lease_expires_at`` into the past, not by sleeping.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from tests.jobs.test_queue import _job, _status, _users
from webapp import schema
from webapp.db import Database
from webapp.records import Job, JobStatus, utcnow
from webapp.services.jobs.leases import HOME_FILE, Instance
from webapp.services.jobs.queue import JobQueue


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    schema.upgrade(database)
    yield database
    database.dispose()


def _queue(db: Database, instance: Instance | None = None, *, max_attempts: int = 3) -> JobQueue:
    return JobQueue(db, max_queued_per_user=100, max_attempts=max_attempts, instance=instance or Instance(),
                    lease_seconds=30)


def _expire(db: Database, job_id: str) -> None:
    with db.write() as s:
        s.exec(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_a_claim_records_the_instance_and_an_expiry_that_renewal_pushes_forward(db):
    a = _queue(db)
    (alice,) = _users(db, "alice")
    job = a.enqueue(_job(alice))
    claimed = a.claim("local")
    row = _status(db, job.id)
    assert claimed.lease_owner == row.lease_owner == a.instance.id
    first = row.lease_expires_at
    assert first is not None
    _expire(db, job.id)
    renewal = a.renew([job.id])
    assert renewal.held == {job.id} and renewal.cancel == set()
    assert _status(db, job.id).lease_expires_at > _status(db, job.id).started_at


def test_another_instance_never_takes_a_job_whose_lease_is_good(db):
    a, b = _queue(db), _queue(db)
    (alice,) = _users(db, "alice")
    job = a.enqueue(_job(alice))
    a.claim("local")
    assert b.recover().changed == () and b.reap().changed == ()  # "running at start" is not "dead"
    assert _status(db, job.id).status == JobStatus.RUNNING
    assert not b.finish(job.id, JobStatus.SUCCEEDED), "only the holder finishes it"
    assert b.requeue(job.id, refund_attempt=True, reason="not mine") is None
    assert b.renew([job.id]).held == set()
    assert a.finish(job.id, JobStatus.SUCCEEDED)


def test_an_expired_lease_is_reaped_once_charged_an_attempt_and_the_old_holder_loses_the_job(db):
    a, b = _queue(db, max_attempts=2), _queue(db, max_attempts=2)
    (alice,) = _users(db, "alice")
    job = a.enqueue(_job(alice))
    a.claim("local")
    _expire(db, job.id)
    reaped = b.reap()
    assert reaped.requeued == (job.id,) and b.reap().changed == ()
    row = _status(db, job.id)
    assert (row.status, row.attempts, row.lease_owner, row.lease_expires_at) == (JobStatus.QUEUED, 1, None, None)
    assert b.claim("local").id == job.id  # the survivor runs it
    assert a.renew([job.id]).held == set(), "the instance that stalled sees it lost the job"
    a.record_progress(job.id, {"step": 99})
    assert not a.finish(job.id, JobStatus.SUCCEEDED) and _status(db, job.id).step == 0

    _expire(db, job.id)  # the survivor dies too: started twice, the limit is 2
    assert a.reap().failed == (job.id,)
    failed = _status(db, job.id)
    assert failed.status == JobStatus.FAILED and "started 2 times" in failed.error


def test_a_cancel_requested_through_another_instance_reaches_the_holder_and_ends_a_dead_ones_job(db):
    a, b = _queue(db), _queue(db)
    (alice,) = _users(db, "alice")
    live, dead = a.enqueue(_job(alice)), a.enqueue(_job(alice))
    a.claim("local")
    a.claim("local")
    assert b.request_cancel(live.id) and b.request_cancel(dead.id)
    assert a.renew([live.id, dead.id]).cancel == {live.id, dead.id}
    _expire(db, dead.id)
    assert b.reap().cancelled == (dead.id,)
    assert _status(db, dead.id).status == JobStatus.CANCELLED
    assert _status(db, live.id).status == JobStatus.RUNNING


def test_a_job_with_a_remote_handle_is_handed_to_an_adopting_instance(db):
    a, b = _queue(db), _queue(db)
    (alice,) = _users(db, "alice")
    job = a.enqueue(_job(alice, endpoint="cloud"))
    a.claim("cloud")
    a.set_handle(job.id, {"inference_id": "inf-1"})
    assert b.detached("cloud") == []
    _expire(db, job.id)
    assert b.reap(adopting=["cloud"]).adopted == (job.id,)
    row = _status(db, job.id)
    assert row.status == JobStatus.RUNNING and row.lease_owner == b.instance.id and row.attempts == 1
    assert [j.id for j in b.detached("cloud")] == [job.id] and a.detached("cloud") == []

    _expire(db, job.id)  # an instance whose backend cannot adopt runs it again instead
    assert a.reap(adopting=[]).requeued == (job.id,)
    assert _status(db, job.id).remote_handle is None


def test_a_restart_on_the_same_data_dir_takes_its_predecessors_jobs_back_at_once(db, tmp_path):
    first = Instance.of_data_dir(tmp_path / "data")
    other = Instance.of_data_dir(tmp_path / "data")  # a second process on the same data dir: its own home
    assert other.home != first.home and (tmp_path / "data" / HOME_FILE).read_text() == first.home
    a, b = _queue(db, first), _queue(db, other)
    (alice,) = _users(db, "alice")
    job = a.enqueue(_job(alice))
    a.claim("local")
    assert b.recover().changed == ()
    first.release()  # the process is gone (the kernel drops its lock)
    again = Instance.of_data_dir(tmp_path / "data")
    try:
        assert again.home == first.home and again.id != first.id
        recovery = _queue(db, again).recover()
        assert recovery.requeued == (job.id,) and _status(db, job.id).status == JobStatus.QUEUED
    finally:
        again.release()
        other.release()
