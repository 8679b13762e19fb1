"""Quotas per role on jobs: queued jobs, jobs per day, GPU-seconds per day (and storage, through the disk quota).

The limits are the most generous of the user's roles; a refusal is 429 ``JobQuotaExceeded`` naming the quota and
when it frees (Retry-After over HTTP for the daily ones), on every path, and stores nothing; the check and the
insert share one write transaction, so parallel submits cannot both take the last slot. Deleting today's jobs or
requeueing a running one gives no daily quota back (the ``quota_usage`` ledger). On SQLite and PostgreSQL (the
GPU-seconds sum is spelled per dialect)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import gradio as gr
import pytest
from sqlmodel import select

from tests.fixtures.postgres import DATABASE_KINDS
from tests.jobs.conftest import add_user, txt2img
from tests.jobs.test_job_access import count, http, member, parked, role
from webapp.records import Job, JobStatus, QuotaUsage
from webapp.services.errors import JobQuotaExceeded
from webapp.services.jobs.leases import Instance
from webapp.services.jobs.quotas import JOB_QUOTAS, gpu_seconds, in_words, next_midnight, recorded
from webapp.services.quota import QuotaExceeded
from webapp.ui.account_tab import AccountTab
from webapp.ui.context import UiContext

BASICS = ["inference:list", "inference:create", "inference:update", "inference:delete", "endpoint:list",
          "endpoint:use", "model:list", "model:use"]


@pytest.fixture(scope="module", params=DATABASE_KINDS)
def fake_studio_database(request) -> str:
    return request.param


def quota_role(studio: Any, name: str, **quotas: int | None) -> Any:
    """Role ``name`` with exactly ``quotas`` (other quotas unlimited)."""
    found = role(studio, name, BASICS)
    values = {"max_queued_jobs": None, "max_jobs_per_day": None, "max_gpu_seconds_per_day": None,
              "max_storage_mb": None, **quotas}
    return studio.roles.update_role(actor=studio.admin, role=found.id, **values)


def test_queued_jobs_quota_counts_queued_and_running_and_frees_as_they_finish(fake_studio):
    quota_role(fake_studio, "Two at once", max_queued_jobs=2)
    quinn = member(fake_studio, "quinn", "Two at once")
    jobs = fake_studio.jobs
    with parked(fake_studio) as parking:
        first = jobs.submit(actor=quinn, mode="txt2img", request=txt2img(), endpoint=parking)
        jobs.submit(actor=quinn, mode="txt2img", request=txt2img(), endpoint=parking)
        before = count(fake_studio)
        with pytest.raises(JobQuotaExceeded) as refused:
            jobs.submit(actor=quinn, mode="txt2img", request=txt2img())
        assert refused.value.field == "max_queued_jobs" and refused.value.status == 429
        assert "2 of 2" in refused.value.message and "frees as your jobs finish" in refused.value.message
        assert refused.value.resets_at is None and refused.value.retry_after is None
        with http(fake_studio, "quinn") as client:
            answer = client.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img()})
            assert answer.status_code == 429 and answer.json()["field"] == "max_queued_jobs", answer.text
            assert "retry-after" not in answer.headers
            a1111 = client.post("/sdapi/v1/txt2img", json=txt2img())
            assert a1111.status_code == 429 and a1111.json()["error"] == "JobQuotaExceeded", a1111.text
        assert count(fake_studio) == before, "refused jobs leave no row"
        jobs.cancel(actor=quinn, job_id=first.id)  # a finished job frees its slot
    jobs.submit(actor=quinn, mode="txt2img", request=txt2img())


def test_jobs_per_day_name_the_reset_at_midnight_utc_on_every_path(fake_studio):
    from tests.jobs.test_job_access import form
    from tests.jobs.test_ui import Tabs, req

    quota_role(fake_studio, "Two a day", max_jobs_per_day=2)
    dana = member(fake_studio, "dana", "Two a day")
    jobs = fake_studio.jobs
    for _ in range(2):
        done = jobs.submit(actor=dana, mode="txt2img", request=txt2img())
        jobs.wait(actor=dana, job_id=done.id, timeout=30)
    before = count(fake_studio)
    with pytest.raises(JobQuotaExceeded) as refused:
        jobs.submit(actor=dana, mode="txt2img", request=txt2img())
    now = datetime.now(UTC)
    assert refused.value.field == "max_jobs_per_day" and "2 of 2" in refused.value.message
    assert refused.value.resets_at == next_midnight(now) and "resets at 00:00 UTC, in " in refused.value.message
    assert abs(refused.value.retry_after - (next_midnight(now) - now).total_seconds()) < 5
    tabs = Tabs(fake_studio)
    with pytest.raises(gr.Error, match="max_jobs_per_day"):
        tabs.txt2img.submit(form(tabs, fake_studio), req(dana))
    with http(fake_studio, "dana") as client:
        answer = client.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img()})
        assert answer.status_code == 429 and answer.json()["field"] == "max_jobs_per_day", answer.text
        assert abs(int(answer.headers["retry-after"]) - (next_midnight(now) - now).total_seconds()) < 5
        a1111 = client.post("/sdapi/v1/txt2img", json=txt2img())
        assert a1111.status_code == 429 and "retry-after" in a1111.headers
        shown = client.get("/api/v1/me/quotas").json()
    assert count(fake_studio) == before
    assert shown["max_jobs_per_day"]["limit"] == 2 and shown["max_jobs_per_day"]["used"] == 2
    assert shown["max_jobs_per_day"]["resets_at"].startswith(next_midnight(now).strftime("%Y-%m-%dT00:00:00"))
    assert shown["max_queued_jobs"] == {"limit": None, "used": 0, "resets_at": None, "source": None}


def test_the_most_generous_role_wins_and_an_unlimited_role_is_never_refused(fake_studio):
    quota_role(fake_studio, "One a day", max_jobs_per_day=1, max_queued_jobs=5)
    quota_role(fake_studio, "Three a day", max_jobs_per_day=3, max_queued_jobs=1)
    gene = member(fake_studio, "gene", "One a day", "Three a day")
    assert fake_studio.roles.effective_quotas(gene)["max_jobs_per_day"] == 3
    assert fake_studio.roles.effective_quotas(gene)["max_queued_jobs"] == 5
    jobs = fake_studio.jobs
    for _ in range(3):
        jobs.wait(actor=gene, job_id=jobs.submit(actor=gene, mode="txt2img", request=txt2img()).id, timeout=30)
    with pytest.raises(JobQuotaExceeded, match="3 of 3"):
        jobs.submit(actor=gene, mode="txt2img", request=txt2img())

    quota_role(fake_studio, "Unlimited helpers")  # a role without a limit lifts it
    free = member(fake_studio, "fran", "One a day", "Unlimited helpers")
    for _ in range(3):
        jobs.wait(actor=free, job_id=jobs.submit(actor=free, mode="txt2img", request=txt2img()).id, timeout=30)

    admin = fake_studio.admin  # the seeded Admin role has no limits, whatever other roles say
    quota_role(fake_studio, "Nothing at all", max_queued_jobs=0, max_jobs_per_day=0, max_gpu_seconds_per_day=0)
    fake_studio.roles.set_user_roles(actor=admin, username="admin", roles=["Admin", "Nothing at all"])
    try:
        with parked(fake_studio) as parking:
            for _ in range(4):
                jobs.submit(actor=fake_studio.users.get_by_name("admin"), mode="txt2img", request=txt2img(),
                            endpoint=parking)
    finally:
        fake_studio.roles.set_user_roles(actor=admin, username="admin", roles=["Admin"])


def test_gpu_seconds_are_the_run_time_of_todays_finished_jobs(fake_studio):
    quota_role(fake_studio, "One GPU-second", max_gpu_seconds_per_day=1)
    gus = member(fake_studio, "gus", "One GPU-second")
    jobs = fake_studio.jobs
    # the fake backend sleeps 5 ms a step: 2 batches of 150 steps run for 1.5 s
    job = jobs.submit(actor=gus, mode="txt2img", request=txt2img(steps=150, n_iter=2))
    done = jobs.wait(actor=gus, job_id=job.id, timeout=60)
    assert done.status == JobStatus.SUCCEEDED
    ran = (done.finished_at - done.started_at).total_seconds()
    assert ran >= 1.0
    used = next(u for u in jobs.quotas.usage(actor=gus) if u.name == "max_gpu_seconds_per_day")
    assert used.used == pytest.approx(ran, abs=0.05) and used.limit == 1
    before = count(fake_studio)
    with pytest.raises(JobQuotaExceeded) as refused:
        jobs.submit(actor=gus, mode="txt2img", request=txt2img())
    assert refused.value.field == "max_gpu_seconds_per_day" and "of 1 today" in refused.value.message
    assert refused.value.resets_at == next_midnight(datetime.now(UTC))
    assert count(fake_studio) == before


def test_gpu_seconds_count_only_todays_part_of_a_job_and_running_ones_until_now(fake_studio):
    """A job that started before midnight counts from 00:00; a running one counts until now."""
    alice = add_user(fake_studio, "alice")
    now = datetime.now(UTC)
    midnight = next_midnight(now) - timedelta(days=1)
    with parked(fake_studio) as parking:
        old = fake_studio.jobs.submit(actor=alice, mode="txt2img", request=txt2img(), endpoint=parking)
        running = fake_studio.jobs.submit(actor=alice, mode="txt2img", request=txt2img(), endpoint=parking)
        with fake_studio.db.write() as s:
            row = s.get(Job, old.id)
            row.status, row.started_at, row.finished_at = JobStatus.SUCCEEDED, midnight - timedelta(hours=2), \
                midnight + timedelta(seconds=30)
            s.add(row)
            row = s.get(Job, running.id)
            row.status, row.started_at = JobStatus.RUNNING, now - timedelta(seconds=20)
            row.lease_owner = fake_studio.jobs.queue.instance.id  # held by this instance: the reaper leaves it
            row.lease_expires_at = now + timedelta(hours=1)
            s.add(row)
        with fake_studio.db.read() as s:
            assert gpu_seconds(s, alice.id, midnight, now) == pytest.approx(50, abs=0.01)
        with fake_studio.db.write() as s:  # as the dispatcher would have left it
            row = s.get(Job, running.id)
            row.status, row.finished_at = JobStatus.CANCELLED, now
            s.add(row)


def _submit_at_once(studio: Any, actor: Any, refusal: type[Exception], n: int = 6) -> list[str]:
    """``n`` submits by ``actor`` to the parked endpoint, started together; each one's outcome, sorted."""
    outcomes: list[str] = []
    start = threading.Barrier(n)

    def submit() -> None:
        start.wait()
        try:
            studio.jobs.submit(actor=actor, mode="txt2img", request=txt2img(), endpoint="parking")
            outcomes.append("queued")
        except refusal:
            outcomes.append("refused")

    threads = [threading.Thread(target=submit) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return sorted(outcomes)


def test_parallel_submits_cannot_both_take_the_last_slot(fake_studio):
    quota_role(fake_studio, "Single slot", max_queued_jobs=1)
    pat = member(fake_studio, "pat", "Single slot")
    with parked(fake_studio):
        assert _submit_at_once(fake_studio, pat, JobQuotaExceeded) == ["queued"] + ["refused"] * 5
        assert fake_studio.jobs.list_jobs(actor=pat)[1] == 1


def test_parallel_submits_cannot_all_fit_under_a_storage_limit_only_one_fits(fake_studio):
    quota_role(fake_studio, "One MiB", max_storage_mb=1)
    dora = member(fake_studio, "dora", "One MiB")
    with parked(fake_studio):
        first = fake_studio.jobs.submit(actor=dora, mode="txt2img", request=txt2img(), endpoint="parking")
        with fake_studio.db.write() as s:  # dora is one byte under her limit: one more job fits, not two
            row = s.get(Job, first.id)
            row.stored_bytes = 2**20 - 1 - sum(j.stored_bytes for j in s.exec(
                select(Job).where(Job.owner_id == dora.id, Job.id != first.id)))
            s.add(row)
        assert _submit_at_once(fake_studio, dora, QuotaExceeded) == ["queued"] + ["refused"] * 5
        assert fake_studio.jobs.list_jobs(actor=dora)[1] == 2


def test_storage_quota_is_the_tighter_of_the_server_and_the_roles(fake_studio):
    quota_role(fake_studio, "No room", max_storage_mb=0)
    nora = member(fake_studio, "nora", "No room")
    before = count(fake_studio)
    with pytest.raises(QuotaExceeded, match="your roles' max_storage_mb") as refused:
        fake_studio.jobs.submit(actor=nora, mode="txt2img", request=txt2img())
    assert refused.value.status == 413 and refused.value.field == "quota"
    assert count(fake_studio) == before
    with http(fake_studio, "nora") as client:
        assert client.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img()}).status_code == 413
        assert client.get("/api/v1/me/disk").json()["limit_bytes"] == 0
        storage = client.get("/api/v1/me/quotas").json()["max_storage_mb"]
    assert storage["limit"] == 0 and storage["source"] == "your roles' max_storage_mb"

    quota_role(fake_studio, "Lots of room", max_storage_mb=10**9)  # looser than the server's 50 GB: the server's
    lots = member(fake_studio, "lotte", "Lots of room")
    limit, source = fake_studio.quota.limit_and_source(lots)
    assert limit == 50 * 1024**3 and source == "the server's user_quota_gb"


def test_the_account_tab_shows_the_job_quotas(fake_studio):
    quota_role(fake_studio, "Shown", max_queued_jobs=5, max_jobs_per_day=100)
    member(fake_studio, "shaun", "Shown")
    studio = fake_studio.studio
    tab = AccountTab(UiContext(users=studio.users), tokens=studio.tokens, auth=studio.auth, quota=studio.quota,
                     job_quotas=studio.jobs.quotas)
    whoami, _, _ = tab.refresh(gr.Request(username="shaun"))
    assert "queued jobs 0 of 5" in whoami and "jobs per day 0 of 100" in whoami
    assert "GPU-seconds per day 0 (no limit)" in whoami and "00:00 UTC" in whoami


def shown_quotas(studio: Any, username: str) -> dict[str, Any]:
    with http(studio, username) as client:
        answer = client.get("/api/v1/me/quotas")
    assert answer.status_code == 200, answer.text
    return answer.json()


def ledger(studio: Any, owner_id: int) -> tuple[int, float]:
    """The owner's ``quota_usage`` row of today (0, 0.0 when none)."""
    with studio.db.read() as s:
        return recorded(s, owner_id, datetime.now(UTC).date())


def test_deleting_todays_jobs_gives_no_jobs_per_day_back(fake_studio):
    from tests.jobs.test_ui import req
    from webapp.ui.context import UiContext as Context
    from webapp.ui.history import HistoryPanel

    quota_role(fake_studio, "Two a day, deleting", max_jobs_per_day=2)
    della = member(fake_studio, "della", "Two a day, deleting")
    jobs = fake_studio.jobs
    done = [jobs.wait(actor=della, job_id=jobs.submit(actor=della, mode="txt2img", request=txt2img()).id, timeout=30)
            for _ in range(2)]
    history = HistoryPanel(Context(users=fake_studio.users), jobs, "txt2img", ("txt2img",))
    history.delete(done[0].id, req(della))  # the UI's delete ...
    with http(fake_studio, "della") as client:  # ... and the ESD bulk delete both end in JobService.delete
        answer = client.request("DELETE", "/api/v1/inferences", json={"inference_id_list": [done[1].id]})
        assert answer.status_code == 200, answer.text
    assert jobs.list_jobs(actor=della)[1] == 0
    assert ledger(fake_studio, della.id) == (2, pytest.approx(sum(
        (job.finished_at - job.started_at).total_seconds() for job in done), abs=0.01))
    before = count(fake_studio)
    with pytest.raises(JobQuotaExceeded) as refused:
        jobs.submit(actor=della, mode="txt2img", request=txt2img())
    assert refused.value.field == "max_jobs_per_day" and "you submitted 2 of 2 today" in refused.value.message
    with http(fake_studio, "della") as client:
        answer = client.post("/api/v1/jobs", json={"mode": "txt2img", "request": txt2img()})
        assert answer.status_code == 429 and answer.json()["field"] == "max_jobs_per_day", answer.text
    assert count(fake_studio) == before, "the refused submits left no row"
    shown = shown_quotas(fake_studio, "della")
    assert shown["max_jobs_per_day"]["used"] == 2 and shown["max_jobs_per_day"]["limit"] == 2


def test_a_deleted_jobs_run_time_still_counts_today(fake_studio):
    quota_role(fake_studio, "One GPU-second, deleting", max_gpu_seconds_per_day=1)
    gwen = member(fake_studio, "gwen", "One GPU-second, deleting")
    jobs = fake_studio.jobs
    job = jobs.submit(actor=gwen, mode="txt2img", request=txt2img(steps=150, n_iter=2))  # runs for 1.5 s
    done = jobs.wait(actor=gwen, job_id=job.id, timeout=60)
    ran = (done.finished_at - done.started_at).total_seconds()
    assert done.status == JobStatus.SUCCEEDED and ran >= 1.0
    with http(fake_studio, "gwen") as client:
        assert client.delete(f"/api/v1/jobs/{job.id}").status_code == 204
    assert jobs.list_jobs(actor=gwen)[1] == 0
    used = {u.name: u.used for u in jobs.quotas.usage(actor=gwen)}
    assert used["max_gpu_seconds_per_day"] == pytest.approx(ran, abs=0.05) and used["max_jobs_per_day"] == 1
    before = count(fake_studio)
    with pytest.raises(JobQuotaExceeded) as refused:
        jobs.submit(actor=gwen, mode="txt2img", request=txt2img())
    assert refused.value.field == "max_gpu_seconds_per_day" and f"ran {ran:.0f} of 1 today" in refused.value.message
    assert count(fake_studio) == before
    shown = shown_quotas(fake_studio, "gwen")["max_gpu_seconds_per_day"]
    assert shown["used"] == used["max_gpu_seconds_per_day"] and shown["limit"] == 1


def test_a_requeued_attempts_run_time_counts(fake_studio):
    """The reaper (the instance died: counted to its lease's expiry) and a requeue by the running instance (counted
    to now) clear ``started_at``; the attempt's time today stays counted, and one that ended yesterday adds nothing."""
    ray = add_user(fake_studio, "ray")
    queue = fake_studio.jobs.queue
    now = datetime.now(UTC)
    midnight = next_midnight(now) - timedelta(days=1)
    with parked(fake_studio) as parking:
        died, handed_back, yesterday = (
            fake_studio.jobs.submit(actor=ray, mode="txt2img", request=txt2img(), endpoint=parking) for _ in range(3))
        dead = Instance()
        with fake_studio.db.write() as s:
            for job_id, started, holder, expires in (
                    (died.id, now - timedelta(seconds=20), dead.id, now - timedelta(seconds=5)),
                    (handed_back.id, now - timedelta(seconds=10), queue.instance.id, now + timedelta(hours=1)),
                    (yesterday.id, midnight - timedelta(hours=2), dead.id, midnight - timedelta(hours=1))):
                row = s.get(Job, job_id)
                row.status, row.started_at, row.attempts = JobStatus.RUNNING, started, 1
                row.lease_owner, row.lease_expires_at = holder, expires
                s.add(row)
        fake_studio.jobs.reap()  # the lease reaper may have been first: either way the two dead ones are requeued
        assert queue.requeue(handed_back.id, refund_attempt=False, reason="the backend lost it") == JobStatus.QUEUED
        for job in (died, handed_back, yesterday):
            found = fake_studio.jobs.get(actor=ray, job_id=job.id)
            assert found.status == JobStatus.QUEUED and found.started_at is None
        jobs, seconds = ledger(fake_studio, ray.id)
        assert jobs == 0 and seconds == pytest.approx(15 + 10, abs=1.0)
        used = {u.name: u.used for u in fake_studio.jobs.quotas.usage(actor=ray)}
        assert used["max_gpu_seconds_per_day"] == pytest.approx(seconds, abs=0.1)
        assert used["max_jobs_per_day"] == 3, "a requeued job is still one submission"
        assert shown_quotas(fake_studio, "ray")["max_gpu_seconds_per_day"]["used"] == used["max_gpu_seconds_per_day"]


def test_a_job_from_yesterday_deleted_today_gives_the_ledger_only_todays_part(fake_studio):
    yves = add_user(fake_studio, "yves")
    jobs = fake_studio.jobs
    now = datetime.now(UTC)
    midnight = next_midnight(now) - timedelta(days=1)
    with parked(fake_studio) as parking:
        old, across = (jobs.submit(actor=yves, mode="txt2img", request=txt2img(), endpoint=parking) for _ in range(2))
        with fake_studio.db.write() as s:
            for job_id, started, finished in ((old.id, midnight - timedelta(hours=2), midnight - timedelta(hours=1)),
                                              (across.id, midnight - timedelta(minutes=30), midnight + timedelta(seconds=30))):
                row = s.get(Job, job_id)
                row.status, row.created_at = JobStatus.SUCCEEDED, midnight - timedelta(hours=3)
                row.started_at, row.finished_at = started, finished
                s.add(row)
            s.add(QuotaUsage(owner_id=yves.id, day=(midnight - timedelta(days=1)).date(), jobs=7, gpu_seconds=99.0))
        before = {u.name: u.used for u in jobs.quotas.usage(actor=yves)}
        assert before["max_jobs_per_day"] == 0 and before["max_gpu_seconds_per_day"] == 30

        jobs.delete(actor=yves, job_id=old.id)
        assert ledger(fake_studio, yves.id) == (0, 0.0), "nothing of it counted today"
        jobs.delete(actor=yves, job_id=across.id)
        assert ledger(fake_studio, yves.id) == (0, pytest.approx(30, abs=0.01)), "only the run time after 00:00"
        after = {u.name: u.used for u in jobs.quotas.usage(actor=yves)}
        assert {name: after[name] for name in JOB_QUOTAS} == {name: before[name] for name in JOB_QUOTAS}
        with fake_studio.db.read() as s:
            days = s.exec(select(QuotaUsage.day).where(QuotaUsage.owner_id == yves.id)).all()
        assert days == [midnight.date()], "writing today's row dropped yesterday's"


def test_deleting_a_user_deletes_their_ledger_rows(fake_studio):
    leah = add_user(fake_studio, "leah")
    job = fake_studio.jobs.submit(actor=leah, mode="txt2img", request=txt2img())
    fake_studio.jobs.delete(actor=leah, job_id=job.id)
    assert ledger(fake_studio, leah.id)[0] == 1
    fake_studio.users.delete_user(actor=fake_studio.admin, username="leah")
    with fake_studio.db.read() as s:
        assert s.exec(select(QuotaUsage).where(QuotaUsage.owner_id == leah.id)).all() == []


def test_reset_times_in_words():
    assert in_words(3 * 3600 + 12 * 60 + 5) == "3 h 12 min"
    assert in_words(12 * 60) == "12 min" and in_words(40) == "40 s"
    assert next_midnight(datetime(2024, 2, 29, 23, 59, tzinfo=UTC)) == datetime(2024, 3, 1, tzinfo=UTC)
