"""The body-size middleware on a bare app: declared and streamed bodies, whatever the route does on a
failed read, and the exempt routes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from webapp.web.limits import BodySizeLimit

LIMIT = 1000


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = FastAPI()
    seen: list[dict] = []

    @app.post("/api/echo")
    async def echo(request: Request) -> dict:
        seen.append(dict(request.headers))
        return {"size": len(await request.body())}

    @app.post("/sdapi/v1/swallow")
    async def swallow(request: Request) -> dict:
        try:
            await request.body()
        except Exception:  # noqa: BLE001 - a route that answers something of its own on any failure
            return {"answered": "by the route"}
        return {"answered": "normally"}

    @app.put("/api/v1/uploads/abc")
    async def upload(request: Request) -> dict:
        return {"size": len(await request.body())}

    app.add_middleware(BodySizeLimit, max_bytes=LIMIT, exempt=[("PUT", "/api/v1/uploads/")])
    with TestClient(app) as test_client:
        test_client.seen = seen  # type: ignore[attr-defined]
        yield test_client


def chunks(size: int) -> Iterator[bytes]:
    for _ in range(size // 100):
        yield b"x" * 100


def test_declared_and_streamed_bodies_over_the_limit_get_413_naming_body(client):
    assert client.post("/api/echo", content=b"x" * LIMIT).json() == {"size": LIMIT}
    declared = client.post("/api/echo", content=b"x" * (LIMIT + 1))
    assert declared.status_code == 413 and declared.json()["field"] == "body"
    before = len(client.seen)
    streamed = client.post("/api/echo", content=chunks(LIMIT + 100))
    assert len(client.seen) == before + 1 and "content-length" not in client.seen[-1], "counted, not declared"
    assert streamed.status_code == 413 and streamed.json()["field"] == "body"
    assert client.post("/api/echo", content=chunks(LIMIT)).json() == {"size": LIMIT}


def test_a_route_that_answers_its_own_failed_read_is_overridden_in_a1111_shape(client):
    answer = client.post("/sdapi/v1/swallow", content=chunks(LIMIT + 100))
    assert answer.status_code == 413
    assert {"error", "detail", "body", "errors"} <= set(answer.json()) and answer.json()["field"] == "body"


def test_exempt_routes_take_larger_bodies(client):
    assert client.put("/api/v1/uploads/abc", content=b"x" * (LIMIT * 5)).json() == {"size": LIMIT * 5}
    assert client.post("/api/v1/uploads/abc", content=b"x" * (LIMIT * 5)).status_code == 413  # only PUT


def test_limits_come_from_flags_and_the_environment(monkeypatch):
    from pipelines.types import RequestLimits
    from webapp.settings import Settings, settings_from_args

    defaults = Settings()
    assert defaults.max_body_mb == 64 and defaults.request_limits == RequestLimits()
    monkeypatch.setenv("STUDIO_MAX_PROMPT_CHARS", "2000")
    monkeypatch.setenv("STUDIO_MAX_JOB_IMAGES", "16")
    settings = settings_from_args(["--max-body-mb", "8", "--max-job-pixels", "1000000"])
    assert settings.max_body_mb == 8
    assert settings.request_limits == RequestLimits(max_prompt_chars=2000, max_job_pixels=1_000_000, max_job_images=16)
