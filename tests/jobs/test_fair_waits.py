"""Waiting clients cost no thread: one user's many long waits cannot delay another user's answer.

A real server (uvicorn in a thread) on the fake backend. Alice holds more waits than any thread pool
the server had for them (70 > 64); Bob's short wait, and Bob's blocking A1111 txt2img, must answer
about as fast as Bob's own baseline measured in the same test, while every one of Alice's waits is
still open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_PASSWORD
from tests.fixtures.studio_models import ModelStudio, build_model_studio
from tests.jobs.conftest import add_user, empty_queue, txt2img
from tests.live import run_async, serve
from webapp.records import JobStatus

FLOOD = 70
"""More than the 64 threads each wait pool used to have."""
HELD_SECONDS = 20.0
"""How long each of Alice's waits stays open unless something changes."""
LONG_STEPS = 150
STEP_DELAY = 0.2  # a 150-step job runs 30 s: longer than the test


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_files) -> Iterator[tuple[ModelStudio, str]]:
    from webapp.settings import Settings

    data_dir = tmp_path_factory.mktemp("fair-waits") / "data"

    def make(**overrides: Any) -> Settings:
        return Settings(data_dir=data_dir, admin_password=ADMIN_PASSWORD, **overrides)

    with build_model_studio(make, tiny_model_files, backend="fake", backend_options={"step_delay": STEP_DELAY},
                            max_queued_jobs_per_user=FLOOD + 10) as built, serve(built.app) as base:
        yield built, base
        empty_queue(built)


def _token(studio: ModelStudio, username: str) -> dict[str, str]:
    user = add_user(studio, username)
    token, _ = studio.tokens.create(actor=user, name=f"fair waits {time.monotonic_ns()}")
    return {"authorization": f"Bearer {token}"}


def _running(studio: ModelStudio, job_id: str) -> None:
    deadline = time.monotonic() + 10
    while studio.jobs.get(actor=studio.admin, job_id=job_id).status != JobStatus.RUNNING:
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.02)


def _queued(studio: ModelStudio, username: str) -> None:
    user = add_user(studio, username)
    deadline = time.monotonic() + 30
    while not studio.jobs.list_jobs(actor=user, status=JobStatus.QUEUED.value, limit=1)[1]:
        assert time.monotonic() < deadline, f"{username}'s job never reached the queue"
        time.sleep(0.02)


async def _timed(coro: Any) -> tuple[float, Any]:
    start = time.monotonic()
    value = await coro
    return time.monotonic() - start, value


async def _while_held(waits: list[asyncio.Task], timed: Any, timeout: float) -> tuple[float, httpx.Response, int]:
    """Bob's (seconds, answer) while Alice's ``waits`` are held, and how many of them were still open."""
    try:
        elapsed, answer = await asyncio.wait_for(timed, timeout)
        return elapsed, answer, sum(not task.done() for task in waits)
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


def test_one_users_long_polls_do_not_delay_another_users_poll(live):
    studio, base = live
    alice, bob = _token(studio, "alice"), _token(studio, "bob")
    long = studio.jobs.submit(actor=add_user(studio, "alice"), mode="txt2img", request=txt2img(steps=LONG_STEPS))
    _running(studio, long.id)
    # Queued behind the long job: nothing about these changes while the test runs.
    held = studio.jobs.submit(actor=add_user(studio, "alice"), mode="txt2img", request=txt2img())
    mine = studio.jobs.submit(actor=add_user(studio, "bob"), mode="txt2img", request=txt2img())

    async def scenario() -> tuple[float, float, int]:
        limits = httpx.Limits(max_connections=FLOOD + 10, max_keepalive_connections=FLOOD + 10)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=HELD_SECONDS + 30) as client:
            poll = f"/api/v1/jobs/{mine.id}/progress?wait=1"
            baseline, answer = await _timed(client.get(poll, headers=bob))
            assert answer.status_code == 200 and answer.json()["status"] == "queued"
            waits = [asyncio.create_task(client.get(f"/api/v1/jobs/{held.id}/progress?wait={HELD_SECONDS}",
                                                    headers=alice)) for _ in range(FLOOD)]
            await asyncio.sleep(2.0)  # every one of Alice's waits has reached the server
            flooded, answer, still_open = await _while_held(waits, _timed(client.get(poll, headers=bob)),
                                                            HELD_SECONDS - 5)
            assert answer.status_code == 200
            return baseline, flooded, still_open

    baseline, flooded, still_open = run_async(scenario())
    assert still_open == FLOOD, "Alice's waits were all still open when Bob was answered"
    assert flooded < baseline + 2.0, f"Bob's 1 s poll took {flooded:.1f} s under the flood (alone: {baseline:.1f} s)"
    for job in (long, held, mine):
        studio.jobs.delete(actor=studio.admin, job_id=job.id)


def test_one_users_blocking_txt2img_requests_do_not_delay_another_users(live):
    studio, base = live
    alice, bob = _token(studio, "alice"), _token(studio, "bob")
    quick = {"prompt": "a quick fox", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}

    async def scenario() -> tuple[float, float, int]:
        limits = httpx.Limits(max_connections=FLOOD + 10, max_keepalive_connections=FLOOD + 10)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
            baseline, answer = await _timed(client.post("/sdapi/v1/txt2img", json=quick, headers=bob))
            assert answer.status_code == 200, answer.text
            long = studio.jobs.submit(actor=add_user(studio, "alice"), mode="txt2img",
                                      request=txt2img(steps=LONG_STEPS))
            await asyncio.to_thread(_running, studio, long.id)  # Alice has been served: Bob's job comes next
            body = {**quick, "prompt": "a slow fox", "steps": LONG_STEPS}
            waits = [asyncio.create_task(client.post("/sdapi/v1/txt2img", json=body, headers=alice))
                     for _ in range(FLOOD)]
            await asyncio.sleep(3.0)  # every one of Alice's requests has reached the server

            async def bob_once_a_slot_frees() -> tuple[float, httpx.Response]:
                mine = asyncio.create_task(client.post("/sdapi/v1/txt2img", json=quick, headers=bob))
                await asyncio.to_thread(_queued, studio, "bob")  # waiting when the slot frees, not after
                await asyncio.to_thread(studio.jobs.cancel, actor=studio.admin, job_id=long.id)
                return await _timed(mine)

            flooded, answer, still_open = await _while_held(waits, bob_once_a_slot_frees(), 20)
            assert answer.status_code == 200, answer.text
            return baseline, flooded, still_open

    baseline, flooded, still_open = run_async(scenario())
    assert still_open == FLOOD, "Alice's requests were all still waiting when Bob was answered"
    assert flooded < baseline + 5.0, (f"Bob's txt2img took {flooded:.1f} s once a slot was free under the flood "
                                      f"(alone: {baseline:.1f} s)")


def test_board_async_wait_wakes_on_a_change_from_another_thread_and_honours_its_timeout():
    import threading

    from webapp.services.jobs.board import JobBoard

    board = JobBoard()

    async def scenario() -> tuple[float, int, float, int]:
        threading.Timer(0.2, board.touch, args=("job",)).start()
        woken, version = await _timed(board.wait_async("job", 0, 10.0))
        timed_out, same = await _timed(board.wait_async("job", version, 0.3))
        return woken, version, timed_out, same

    woken, version, timed_out, same = run_async(scenario())
    assert version == board.version("job") > 0 and woken < 5.0, "woken by the writer's thread, not the timeout"
    assert same == version and 0.25 <= timed_out < 5.0
    assert not board._async_waiters, "finished waits leave nothing registered"
