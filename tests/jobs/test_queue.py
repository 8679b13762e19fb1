"""Queue semantics on a real SQLite file and a real PostgreSQL database: atomic claims under 8 threads,
fairness, the cap, cancel, recovery."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from webapp.db import Database
from webapp.records import Job, JobStatus, User
from webapp.services.errors import Throttled
from webapp.services.jobs.queue import JobQueue


@pytest.fixture
def db(upgraded_db):
    return upgraded_db


def _users(db: Database, *names: str) -> list[User]:
    users = [User(username=n, password_hash="x") for n in names]
    with db.write() as s:
        for user in users:
            s.add(user)
        s.flush()
        for user in users:
            s.refresh(user)
    return users


def _job(owner: User, endpoint: str = "local", **values) -> Job:
    return Job(owner_id=owner.id, owner_name=owner.username, mode="txt2img", endpoint=endpoint,
               request_json="{}", **values)


def _status(db: Database, job_id: str) -> Job:
    with db.read() as s:
        return s.get(Job, job_id)


def test_claims_are_atomic_under_eight_threads(db):
    queue = JobQueue(db, max_queued_per_user=1000, max_attempts=3)
    owners = _users(db, *(f"u{i}" for i in range(5)))
    ids = {queue.enqueue(_job(owners[i % 5])).id for i in range(120)}
    claimed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def claimer() -> None:
        start.wait()
        while True:
            job = queue.claim("local", worker="t")
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = Counter(claimed)
    assert set(counts) == ids, "every job claimed (none lost)"
    assert max(counts.values()) == 1, "no job claimed twice"
    with db.read() as s:
        rows = s.query(Job).all()
    assert {r.status for r in rows} == {JobStatus.RUNNING} and {r.attempts for r in rows} == {1}


def test_one_users_hundred_jobs_do_not_starve_anothers_single_job(db):
    queue = JobQueue(db, max_queued_per_user=1000, max_attempts=3)
    alice, bob, carol = _users(db, "alice", "bob", "carol")
    for _ in range(100):
        queue.enqueue(_job(alice))
    bob_job = queue.enqueue(_job(bob))
    order = []
    for _ in range(4):  # one slot: claim, finish, claim next
        job = queue.claim("local")
        order.append(job.owner_name)
        assert queue.finish(job.id, JobStatus.SUCCEEDED)
        if len(order) == 2:
            queue.enqueue(_job(carol))
    assert order[:2] == ["alice", "bob"], "bob waits for one job, not for alice's hundred"
    assert order[2] == "carol", "carol has never been served: she goes before alice's backlog"
    assert _status(db, bob_job.id).status == JobStatus.SUCCEEDED


def test_with_two_slots_the_owner_with_fewer_running_jobs_goes_first(db):
    queue = JobQueue(db, max_queued_per_user=1000, max_attempts=3)
    alice, bob = _users(db, "alice", "bob")
    for _ in range(3):
        queue.enqueue(_job(alice))
    first = queue.claim("local")
    queue.enqueue(_job(bob))
    second = queue.claim("local")  # alice has one running, bob none
    assert (first.owner_name, second.owner_name) == ("alice", "bob")


def test_claims_only_the_endpoints_own_jobs_oldest_first(db):
    queue = JobQueue(db, max_queued_per_user=1000, max_attempts=3)
    (alice,) = _users(db, "alice")
    a = queue.enqueue(_job(alice, endpoint="local"))
    queue.enqueue(_job(alice, endpoint="cloud"))
    b = queue.enqueue(_job(alice, endpoint="local"))
    assert [queue.claim("local").id, queue.claim("local").id, queue.claim("local")] == [a.id, b.id, None]


def test_per_user_cap_refuses_with_a_clear_error_and_leaves_no_row(db):
    queue = JobQueue(db, max_queued_per_user=2, max_attempts=3)
    alice, bob = _users(db, "alice", "bob")
    queue.enqueue(_job(alice))
    queue.enqueue(_job(alice))
    with pytest.raises(Throttled, match="2 queued jobs.*most one user may queue"):
        queue.enqueue(_job(alice))
    queue.enqueue(_job(bob))  # the cap is per user
    running = queue.claim("local")
    assert running.owner_name == "alice"
    queue.enqueue(_job(alice))  # a running job no longer counts as queued
    with db.read() as s:
        assert s.query(Job).filter(Job.owner_id == alice.id).count() == 3


def test_cancel_queued_and_request_cancel_of_running(db):
    queue = JobQueue(db, max_queued_per_user=10, max_attempts=3)
    (alice,) = _users(db, "alice")
    waiting = queue.enqueue(_job(alice))
    assert queue.cancel_queued(waiting.id)
    assert not queue.cancel_queued(waiting.id)
    assert _status(db, waiting.id).status == JobStatus.CANCELLED
    running = queue.enqueue(_job(alice))
    queue.claim("local")
    assert not queue.cancel_queued(running.id)
    assert queue.request_cancel(running.id)
    assert _status(db, running.id).cancel_requested


def test_recovery_requeues_fails_after_max_attempts_and_cancels_what_was_being_cancelled(db):
    queue = JobQueue(db, max_queued_per_user=10, max_attempts=2)
    (alice,) = _users(db, "alice")
    first = queue.enqueue(_job(alice))
    second = queue.enqueue(_job(alice))
    third = queue.enqueue(_job(alice))
    for _ in range(3):
        queue.claim("local")
    queue.request_cancel(third.id)
    recovery = queue.recover()  # "the server was killed": all three were running
    assert set(recovery.requeued) == {first.id, second.id} and recovery.cancelled == (third.id,)
    assert _status(db, first.id).status == JobStatus.QUEUED and _status(db, first.id).started_at is None

    # the same two jobs are started again and the server dies again: attempt 2 of 2 -> failed, with the reason
    queue.claim("local")
    queue.claim("local")
    recovery = queue.recover()
    assert set(recovery.failed) == {first.id, second.id}
    failed = _status(db, first.id)
    assert failed.status == JobStatus.FAILED and failed.attempts == 2
    assert "started 2 times" in failed.error and "stops the server" in failed.error
    assert queue.recover().requeued == ()  # nothing left running


def test_finish_only_moves_running_jobs(db):
    queue = JobQueue(db, max_queued_per_user=10, max_attempts=3)
    (alice,) = _users(db, "alice")
    job = queue.enqueue(_job(alice))
    assert not queue.finish(job.id, JobStatus.SUCCEEDED), "a queued job cannot succeed without running"
    queue.claim("local")
    assert queue.finish(job.id, JobStatus.FAILED, error="boom", error_kind="internal", warnings_json=["w"])
    row = _status(db, job.id)
    assert (row.status, row.error, row.warnings) == (JobStatus.FAILED, "boom", ["w"])
    assert not queue.finish(job.id, JobStatus.SUCCEEDED), "a finished job stays finished"
    with pytest.raises(ValueError):
        queue.finish(job.id, JobStatus.RUNNING)


def test_the_claimed_job_says_the_attempt_the_row_records(db):
    """The dispatcher builds the spec (``attempt``) from the claimed object: it must match the row."""
    queue = JobQueue(db, max_queued_per_user=10, max_attempts=3)
    (alice,) = _users(db, "alice")
    job = queue.enqueue(_job(alice))
    first = queue.claim("local")
    assert first.attempts == _status(db, job.id).attempts == 1
    queue.recover()
    second = queue.claim("local")
    assert second.id == job.id and second.attempts == _status(db, job.id).attempts == 2
