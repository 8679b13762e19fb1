"""The worker's HTTP API: SageMaker's serving contract plus the self-hosted worker protocol.

Bodies are JSON; errors answer ``{"error": "<code>", "message": "..."}`` (and ``field`` where one is bad). A job
spec over ``--max-body-mb`` (64 MB by default) is refused with 413 ``too_large`` before it is read whole.

SageMaker (real-time and async endpoints run ``docker run image serve``, port 8080):

* ``GET /ping`` → 200 with an empty body once the worker is ready (503 while starting or stopping); no auth.
* ``POST /invocations`` with ``JobSpec.to_json()`` → the terminal event's JSON: 200 for ``succeeded`` and
  ``cancelled`` (images base64 inside), 400 / 500 / 503 for ``failed`` by its kind (bad_request; oom, internal;
  interrupted), so SageMaker reports a failed job as one (ModelError, the async failure location).
  Undecodable spec → 400 ``bad_spec``. With every slot (one per GPU) busy the request waits in line; when
  ``max_waiting`` requests already wait → 503 ``busy``. A job id already held is not run again: the answer is
  that job's outcome. ``X-Amzn-SageMaker-Custom-Attributes`` (``a=1,b=2``) may name asset-store keys
  (``--store`` needed; a bad key → 400 naming the attribute):
  ``progress=<key>`` asks for progress objects (``deploy.container.progress``) — how async invocations report
  steps and previews; ``spec=<key>`` reads the spec from the store instead of the body (missing → 400
  ``bad_spec``); ``results=<prefix>`` writes images to ``<prefix>/<n>.png`` and answers their keys
  (``deploy.container.references``: SageMaker's 6 MB real-time limit).

Self-hosted worker (``deploy/backends/http.py`` is the client), all under ``Authorization: Bearer <secret>``
when the worker has a secret (missing or wrong → 401 ``unauthorized``; ``/invocations`` too):

* ``GET /v1/info`` → ``{"version", "capabilities", "slots", "free_slots", "running": [job_id], "waiting"}``.
* ``POST /v1/jobs`` (JobSpec JSON) → 202 ``{"job_id"}``; no free slot → 503 ``busy``; a job id already held
  (a retried submit) → 200 ``{"job_id", "duplicate": true}`` and it is not run twice.
* ``GET /v1/jobs/{job_id}/events?after=N`` → ``application/x-ndjson``: lines ``{"seq": n, "event": {...}}``
  (seq from 1 per job) with seq > N, first those buffered then live ones; the stream ends after the
  terminal event. ``{"heartbeat": true}`` every ``heartbeat`` seconds (2 by default) while nothing happens.
  Buffered Progress events are thinned to the latest. Unknown job → 404 ``unknown_job``.
* ``GET /v1/jobs/{job_id}`` → ``{"job_id", "done", "last_seq", "terminal": {...} | null}``.
* ``POST /v1/jobs/{job_id}/cancel`` and ``/skip`` → ``{"ok": bool}`` (False: not held, or over).
* ``DELETE /v1/jobs/{job_id}`` → ``{"ok": bool}``: forget a finished job's events (False: unknown or still
  running); finished jobs are forgotten anyway ``buffer_ttl`` (15 min) after their end.
* ``POST /v1/release-memory`` → ``{"ok": true}``: unload the models (the control plane's unload-checkpoint).

SIGTERM (``deploy.container.serve``): ``/ping`` turns 503, new jobs get 503 ``stopping``, waiting and
running jobs end ``Failed(kind="interrupted")`` (their streams deliver it and end), then the process exits 0.
The secret is kept only as its sha256 and compared in constant time; it is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar

import anyio
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deploy.backends.messages import JobSpec, MessageError
from deploy.container import VERSION
from deploy.container.host import HostRefused, WorkerHost
from deploy.container.progress import (
    ATTRIBUTES_HEADER,
    PROGRESS_ATTRIBUTE,
    ProgressWriter,
    parse_custom_attributes,
)
from deploy.container.references import (
    RESULTS_ATTRIBUTE,
    SPEC_ATTRIBUTE,
    answer_status,
    read_spec_bytes,
    reference,
    store_results,
)
from deploy.storage import BlobNotFound, BlobStore, InvalidKey
from pipelines.types import InvalidRequestError

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
WAIT_THREADS = 256
"""Threads for the long waits (streams, invocations), apart from anyio's default pool: a full line of waiting
requests never delays ``/ping`` (SageMaker's health check) or the quick control routes."""
T = TypeVar("T")
HEARTBEAT_LINE = b'{"heartbeat": true}\n'


class ApiError(Exception):
    """Answered as ``{"error": code, "message": ...}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def _error(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "message": message}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status)


def decode_spec(body: bytes) -> JobSpec:
    """The spec from the wire, validated once here: an invalid request or unit → 400 ``bad_request`` naming the
    field (the job's own fault, never retried); anything not a job spec → 400 ``bad_spec``."""
    try:
        return JobSpec.from_json(body)
    except InvalidRequestError as exc:
        raise ApiError(400, "bad_request", str(exc), field=exc.field) from None
    except (MessageError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ApiError(400, "bad_spec", f"the body is not a job spec (JobSpec JSON): {exc}") from None


async def read_spec(request: Request, limit: int) -> JobSpec:
    """The body as a JobSpec, refusing more than ``limit`` bytes (413 ``too_large``) before reading them all."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, "too_large", f"the job spec is larger than this worker's limit of {limit} bytes "
                         f"(--max-body-mb)", field="body")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return decode_spec(bytes(body))


def create_app(host: WorkerHost, *, secret_digest: bytes | None, heartbeat: float = 2.0,
               store: BlobStore | None = None, progress_interval: float = 1.0,
               max_body_bytes: int = 64 * 1024**2) -> FastAPI:
    """The worker's ASGI app over a started ``host``; ``secret_digest`` is sha256 of the shared secret."""
    app = FastAPI(title="studio worker", version=VERSION, docs_url=None, redoc_url=None, openapi_url=None)
    limiters: list[anyio.CapacityLimiter] = []  # made on the server's loop at the first wait

    async def waiting(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not limiters:
            limiters.append(anyio.CapacityLimiter(WAIT_THREADS))
        return await anyio.to_thread.run_sync(partial(function, *args, **kwargs), limiter=limiters[0])

    async def authorised(request: Request) -> None:
        if secret_digest is None:
            return
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(presented.strip().encode("utf-8")).digest()
        if scheme.lower() != "bearer" or not presented or not hmac.compare_digest(given, secret_digest):
            raise ApiError(401, "unauthorized", "missing or wrong shared secret (Authorization: Bearer <secret>)")

    auth = [Depends(authorised)]

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.field)

    @app.exception_handler(HostRefused)
    async def _refused(_request: Request, exc: HostRefused) -> JSONResponse:
        return _error(503, exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        name = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(400, "bad_request", f"`{name}`: {first.get('msg', 'invalid')}", field=name)

    def held(job_id: str) -> Any:
        buffer = host.buffer(job_id)
        if buffer is None:
            raise ApiError(404, "unknown_job", f"this worker holds no job {job_id!r} (never sent, or forgotten)")
        return buffer

    # Quick routes are coroutines: they only take the host's lock briefly, and need no thread.
    @app.get("/ping")
    async def ping() -> Response:
        return Response(status_code=200 if host.ready else 503)

    def store_key(attributes: dict[str, str], name: str) -> str | None:
        try:
            key = reference(attributes, name)
        except InvalidKey as exc:
            raise ApiError(400, "bad_attributes", f"the {name} key in {ATTRIBUTES_HEADER} is not a store key: "
                           f"{exc}", field=name) from None
        if key is not None and store is None and name != PROGRESS_ATTRIBUTE:
            raise ApiError(400, "no_store", f"{name}=<key> in {ATTRIBUTES_HEADER} needs a worker started with "
                           f"--store (the caller's asset store)", field=name)
        return key

    async def stored_spec(key: str) -> JobSpec:
        assert store is not None
        try:
            data = await waiting(read_spec_bytes, store, key, max_body_bytes)
        except BlobNotFound:
            raise ApiError(400, "bad_spec", f"no job spec stored under {key!r} ({SPEC_ATTRIBUTE}=<key>)",
                           field=SPEC_ATTRIBUTE) from None
        except ValueError as exc:
            raise ApiError(413, "too_large", str(exc), field=SPEC_ATTRIBUTE) from None
        return decode_spec(data)

    @app.post("/invocations", dependencies=auth)
    async def invocations(request: Request) -> Response:
        attributes = parse_custom_attributes(request.headers.get(ATTRIBUTES_HEADER))
        key, spec_key, results = (store_key(attributes, name)
                                  for name in (PROGRESS_ATTRIBUTE, SPEC_ATTRIBUTE, RESULTS_ATTRIBUTE))
        spec = await (stored_spec(spec_key) if spec_key else read_spec(request, max_body_bytes))
        writer = None
        if key is not None:
            if store is None:
                log.warning("job %s asked for progress at %s but this worker has no --store", spec.job_id, key)
            else:
                writer = ProgressWriter(store, key, interval=progress_interval)
        terminal = await waiting(host.run, spec, on_event=writer)
        host.forget(spec.job_id)  # the answer carries the outcome; nobody will fetch it again
        if results is not None and store is not None:
            terminal = await waiting(store_results, terminal, store, results)
        return Response(terminal.to_json(), status_code=answer_status(terminal), media_type="application/json")

    @app.get("/v1/info", dependencies=auth)
    async def info() -> dict[str, Any]:
        return {"version": VERSION, "capabilities": host.backend.capabilities().to_dict(), "slots": host.slots,
                "free_slots": host.free_slots(), "running": host.running(), "waiting": host.waiting(),
                "ready": host.ready}

    @app.post("/v1/jobs", dependencies=auth)
    async def submit(request: Request) -> JSONResponse:
        spec = await read_spec(request, max_body_bytes)
        if not host.submit(spec):
            return JSONResponse({"job_id": spec.job_id, "duplicate": True}, status_code=200)
        return JSONResponse({"job_id": spec.job_id}, status_code=202)

    @app.get("/v1/jobs/{job_id}/events", dependencies=auth)
    async def events(job_id: str, after: int = Query(0, ge=0)) -> StreamingResponse:
        buffer = held(job_id)

        async def lines() -> AsyncIterator[bytes]:
            seq = after
            while True:
                found = await waiting(host.wait_events, buffer, seq, heartbeat)
                for seq, event in found:  # noqa: B007 - seq carries on to the next wait
                    yield (json.dumps({"seq": seq, "event": event.to_dict()}) + "\n").encode("utf-8")
                if buffer.done and seq >= buffer.last_seq:
                    return
                if not found and not buffer.done:  # (done meanwhile: the next wait returns the rest at once)
                    yield HEARTBEAT_LINE

        return StreamingResponse(lines(), media_type=NDJSON, headers={"Cache-Control": "no-store"})

    @app.get("/v1/jobs/{job_id}", dependencies=auth)
    async def state(job_id: str) -> dict[str, Any]:
        buffer = held(job_id)
        terminal = buffer.terminal
        return {"job_id": job_id, "done": buffer.done, "last_seq": buffer.last_seq,
                "terminal": terminal.to_dict() if terminal is not None else None}

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=auth)
    async def cancel(job_id: str) -> dict[str, bool]:
        return {"ok": host.cancel(job_id)}

    @app.post("/v1/jobs/{job_id}/skip", dependencies=auth)
    async def skip(job_id: str) -> dict[str, bool]:
        return {"ok": host.skip(job_id)}

    @app.delete("/v1/jobs/{job_id}", dependencies=auth)
    async def forget(job_id: str) -> dict[str, bool]:
        return {"ok": host.forget(job_id)}

    @app.post("/v1/release-memory", dependencies=auth)
    async def release_memory() -> dict[str, bool]:
        await waiting(host.release_memory)
        return {"ok": True}

    return app
