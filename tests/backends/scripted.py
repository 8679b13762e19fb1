"""A scripted worker behind ``httpx.MockTransport``: the faults a real network makes, on cue.

The real worker (deploy/container) runs in the contract suite; here each test says exactly what every
route answers — a stream that drops after two events, a submit whose answer is lost, a worker that
restarted and no longer knows the job — so the ``http`` backend's recovery is asserted step by step.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from deploy.backends.messages import Event

Answer = Callable[[httpx.Request], httpx.Response]


def line(seq: int, event: Event) -> bytes:
    return json.dumps({"seq": seq, "event": event.to_dict()}).encode() + b"\n"


HEARTBEAT = b'{"heartbeat": true}\n'


class Lines(httpx.SyncByteStream):
    """An NDJSON body: the given lines, then (optionally) a transport error, or heartbeats until released."""

    def __init__(self, lines: list[bytes], *, then: Exception | None = None, hold: threading.Event | None = None):
        self.lines, self.then, self.hold = lines, then, hold

    def __iter__(self) -> Iterator[bytes]:
        yield from self.lines
        if self.then is not None:
            raise self.then
        while self.hold is not None and not self.hold.is_set():
            time.sleep(0.02)
            yield HEARTBEAT


def stream(lines: list[bytes], **kwargs: Any) -> httpx.Response:
    return httpx.Response(200, stream=Lines(lines, **kwargs), headers={"Content-Type": "application/x-ndjson"})


def info(slots: int = 2) -> dict[str, Any]:
    return {"version": "test-worker", "slots": slots, "free_slots": slots, "running": [],
            "capabilities": {"modes": ["txt2img"], "slots": slots, "remote": False, "previews": True,
                             "devices": ["cuda:0", "cuda:1"][:slots], "model_types": ["checkpoint", "lora"],
                             "extra": {}}}


@dataclass
class ScriptedWorker:
    """Routes by ``"METHOD /path"``: each key holds a list of answers used in turn (the last one repeats).

    An answer is a callable ``request -> Response`` (it may raise an ``httpx`` error to be a network fault).
    Every request is recorded (method, path, query, JSON body) for assertions."""

    routes: dict[str, list[Answer]] = field(default_factory=dict)
    seen: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.routes.setdefault("GET /v1/info", [lambda r: httpx.Response(200, json=info())])

    def on(self, route: str, *answers: Answer) -> ScriptedWorker:
        self.routes[route] = list(answers)
        return self

    def __call__(self, request: httpx.Request) -> httpx.Response:
        route = f"{request.method} {request.url.path}"
        body = json.loads(request.content) if request.content else None
        self.seen.append((request.method, request.url.path, dict(request.url.params), body))
        self.headers.append(dict(request.headers))
        answers = self.routes.get(route)
        if not answers:
            return httpx.Response(404, json={"error": "unknown_job", "message": f"no route {route}"})
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        return answer(request)

    def calls(self, method: str, path: str) -> list[tuple[dict[str, str], Any]]:
        return [(query, body) for m, p, query, body in self.seen if (m, p) == (method, path)]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def respond(status: int, body: Any = None) -> Answer:
    return lambda request: httpx.Response(status, json=body)


def fail(exc_type: type[httpx.TransportError], message: str = "link dropped") -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        raise exc_type(message, request=request)

    return answer
