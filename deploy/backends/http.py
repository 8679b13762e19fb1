"""The ``http`` backend: jobs run on a self-hosted worker — our serving container on any GPU box — over HTTP(S).

The protocol is documented for users in deploy/container/server.py. This side adds robustness, because the
network and the worker fail independently of the studio:

* ``submit`` is retried on a transport error with the same job id; the worker answers a repeat with
  ``duplicate: true`` instead of running the job twice;
* each held job has a follower thread that reads the job's NDJSON event stream and forwards the events to
  the sink. A dropped link reconnects with ``after=<last seq>`` (nothing seen twice, nothing lost); a worker
  silent for ``grace_seconds`` (missed heartbeats, then failed reconnects), or one that no longer knows the
  job (it restarted), ends the job ``Failed(kind="interrupted")`` and the queue runs it again;
* a poller reads ``/v1/info`` every ``poll_seconds``: ``health()`` answers from what it last saw and
  ``free_slots()`` is 0 while the worker is unreachable, slow or refuses the secret, so the dispatcher
  claims nothing for it and its jobs wait;
* the secret lives in the ``Authorization`` header of one client built at start; it is never logged and
  never part of an error message or a ``repr``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from deploy.backends.base import (
    STOPPED_MESSAGE,
    Backend,
    BackendBusy,
    BackendError,
    Capabilities,
    EventSink,
    deliver,
)
from deploy.backends.messages import (
    TERMINAL_EVENTS,
    Event,
    Failed,
    JobSpec,
    MessageError,
    Started,
    event_from_dict,
)
from deploy.backends.registry import BackendConfig

log = logging.getLogger(__name__)


class _JobUnknown(Exception):
    """The worker answered 404 for a job this backend holds: it restarted or dropped the job."""


class _BadStream(Exception):
    """The worker sent something this side cannot read (a protocol mismatch, not a network failure)."""


@dataclass
class _Link:
    """What the backend knows about one held job's event stream."""

    job_id: str
    last_seq: int = 0
    heard: float = 0.0
    """``time.monotonic()`` of the last line (event or heartbeat) from the worker about this job."""
    response: httpx.Response | None = None
    thread: threading.Thread | None = None


def _error_body(response: httpx.Response) -> dict:
    """The worker's JSON error body, or {} when it sent something else."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error_text(response: httpx.Response) -> str:
    """The worker's ``{"error", "message"}`` body as one short line (or the start of whatever it sent)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)[:300]
    return str(body)[:200]


class HttpWorkerBackend(Backend):
    kind = "http"

    def __init__(self, name: str, *, url: str, secret: str, slots: int = 1, timeout_seconds: float = 30.0,
                 verify_tls: bool = True, poll_seconds: float = 5.0, heartbeat_timeout: float = 6.0,
                 grace_seconds: float = 20.0, reconnect_delay: float = 0.25, submit_attempts: int = 3,
                 transport: httpx.BaseTransport | None = None) -> None:
        """``heartbeat_timeout``: a stream silent this long is a dead link (the worker sends a heartbeat every
        2 s). ``grace_seconds``: how long a job's worker may stay unheard (dead links, failed reconnects)
        before the job is reported interrupted. ``transport``: tests inject faults here."""
        super().__init__(name)
        if slots < 1:
            raise ValueError(f"http backend slots must be at least 1, got {slots}")
        self.url = url.rstrip("/")
        self.slots = slots
        self.timeout_seconds = float(timeout_seconds)
        self.verify_tls = verify_tls
        self.poll_seconds = float(poll_seconds)
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.grace_seconds = float(grace_seconds)
        self.reconnect_delay = float(reconnect_delay)
        self.submit_attempts = max(1, int(submit_attempts))
        self._secret = secret
        self._transport = transport
        self._client: httpx.Client | None = None
        self._sink: EventSink | None = None
        self._lock = threading.Lock()
        self._held: dict[str, _Link] = {}
        self._stopping = False
        self._wake = threading.Event()  # set by stop(): pollers and reconnect waits end at once
        self._poller: threading.Thread | None = None
        self._health: tuple[bool, str | None] = (False, f"waiting for the first answer from {self.url}")
        self._info: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"HttpWorkerBackend(name={self.name!r}, url={self.url!r}, slots={self.slots})"

    # -- contract ---------------------------------------------------------------------------------------
    def is_configured(self) -> bool:
        return bool(self.url and self._secret)

    def capabilities(self) -> Capabilities:
        info = self._info
        if not info:
            return Capabilities(slots=self.slots, remote=True, extra={"url": self.url})
        caps = info.get("capabilities") or {}
        default = Capabilities()
        return Capabilities(
            modes=tuple(caps.get("modes") or default.modes), slots=self.slots, remote=True,
            previews=bool(caps.get("previews", True)), devices=tuple(caps.get("devices") or ()),
            model_types=tuple(caps.get("model_types") or default.model_types),
            samplers=tuple(caps.get("samplers") or ()), schedulers=tuple(caps.get("schedulers") or ()),
            upscalers=tuple(caps.get("upscalers") or ()),
            extra={**dict(caps.get("extra") or {}), "url": self.url, "worker_version": info.get("version")})

    def start(self, sink: EventSink) -> None:
        if self._sink is not None:
            raise BackendError(f"backend {self.name!r} is already started")
        self._client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self._secret}"}, verify=self.verify_tls,
            timeout=httpx.Timeout(self.timeout_seconds), transport=self._transport)
        self._sink = sink
        self._poller = threading.Thread(target=self._poll_loop, name=f"backend-{self.name}-health", daemon=True)
        self._poller.start()

    def health(self) -> tuple[bool, str | None]:
        return self._health

    def free_slots(self) -> int:
        if self._sink is None or self._stopping or not self._health[0]:
            return 0
        with self._lock:
            return max(0, self._slot_limit() - len(self._held))

    def submit(self, spec: JobSpec) -> None:
        if self._sink is None or self._stopping:
            raise BackendError(f"backend {self.name!r} is not running")
        with self._lock:
            if spec.job_id in self._held:
                raise BackendError(f"backend {self.name!r} already runs job {spec.job_id}")
            if len(self._held) >= self._slot_limit():
                raise BackendBusy(f"backend {self.name!r} has no free slot")
            link = self._held[spec.job_id] = _Link(spec.job_id, heard=time.monotonic())
        try:
            refused = self._post_job(spec)
        except BaseException:
            with self._lock:
                self._held.pop(spec.job_id, None)
            raise
        if refused is not None:  # the worker cannot read the spec: retrying elsewhere would not help
            self._finish(spec.job_id, refused, forget=False)
            return
        link.thread = threading.Thread(target=self._follow, args=(link,), daemon=True,
                                       name=f"backend-{self.name}-{spec.job_id[:8]}")
        link.thread.start()

    def cancel(self, job_id: str) -> bool:
        return self._job_command(job_id, "cancel")

    def skip(self, job_id: str) -> bool:
        return self._job_command(job_id, "skip")

    def release_memory(self) -> None:
        try:
            response = self._call("POST", "/v1/release-memory")
        except (httpx.HTTPError, BackendError) as exc:
            log.warning("http worker %s: release-memory failed: %s", self.name, exc)
            return
        if response.status_code != 200:
            log.warning("http worker %s: release-memory answered HTTP %d: %s", self.name, response.status_code,
                        _error_text(response))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following; best-effort cancel on the worker; every job still held reports ``interrupted``."""
        self._stopping = True
        self._wake.set()
        with self._lock:
            links = list(self._held.values())
            self._held.clear()
        for link in links:
            try:
                self._call("POST", f"/v1/jobs/{quote(link.job_id, safe='')}/cancel",
                           timeout=min(2.0, self.timeout_seconds))
            except (httpx.HTTPError, BackendError) as exc:
                log.info("http worker %s: could not cancel job %s on stop: %s", self.name, link.job_id, exc)
            self._emit(Failed(job_id=link.job_id, message=STOPPED_MESSAGE, kind="interrupted"))
            response = link.response
            if response is not None:
                response.close()  # the follower's read ends now rather than at the next heartbeat
        deadline = time.monotonic() + timeout
        for thread in [link.thread for link in links] + [self._poller]:
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        if self._client is not None:
            self._client.close()

    # -- health --------------------------------------------------------------------------------------------
    def _slot_limit(self) -> int:
        worker_slots = (self._info or {}).get("slots")
        return min(self.slots, int(worker_slots)) if isinstance(worker_slots, int) and worker_slots > 0 else self.slots

    def _poll_loop(self) -> None:
        while not self._stopping:
            self.probe()
            self._wake.wait(self.poll_seconds)

    def probe(self) -> tuple[bool, str | None]:
        """Ask ``/v1/info`` now and record the answer (the poller calls it; tests may too)."""
        try:
            response = self._call("GET", "/v1/info", timeout=min(5.0, self.timeout_seconds))
        except httpx.TimeoutException:
            self._observe(False, f"the worker at {self.url} did not answer within {min(5.0, self.timeout_seconds):g}s")
        except httpx.HTTPError as exc:
            self._observe(False, f"the worker at {self.url} is unreachable: {type(exc).__name__}: {exc}")
        except BackendError:  # stopped meanwhile
            pass
        else:
            if response.status_code == 401:
                self._observe(False, f"the worker at {self.url} refused the endpoint's secret")
            elif response.status_code != 200:
                self._observe(False, f"the worker at {self.url} answered HTTP {response.status_code}: "
                                     f"{_error_text(response)}")
            else:
                try:
                    info = response.json()
                    if not isinstance(info, dict) or not isinstance(info.get("capabilities"), dict):
                        raise ValueError("no capabilities")
                except ValueError:
                    self._observe(False, f"the worker at {self.url} did not answer /v1/info as a studio worker")
                else:
                    self._info = info
                    self._observe(True, None)
        return self._health

    def _observe(self, healthy: bool, reason: str | None) -> None:
        if self._stopping:
            return
        was = self._health[0]
        self._health = (healthy, reason)
        if was and not healthy:
            log.warning("http worker %s degraded: %s", self.name, reason)
        elif healthy and not was:
            log.info("http worker %s reachable at %s", self.name, self.url)

    # -- requests ---------------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        client = self._client
        if client is None or client.is_closed:
            raise BackendError(f"backend {self.name!r} is not running")
        return client.request(method, path, **kwargs)

    def _post_job(self, spec: JobSpec) -> Failed | None:
        """Hand the job to the worker, retrying transport errors with the same id. None when it took the job
        (202, or 200 ``duplicate`` for a retry whose first answer was lost); a ``Failed`` to report when it
        refuses this job for good (too large, unreadable: sending it again would loop); raises ``BackendBusy``/
        ``BackendError`` when it cannot take jobs now (the dispatcher requeues the job)."""
        body = spec.to_json().encode()
        problem: Exception | None = None
        for attempt in range(self.submit_attempts):
            if attempt:
                self._wake.wait(self.reconnect_delay * 2 ** (attempt - 1))
                if self._stopping:
                    break
            try:
                response = self._call("POST", "/v1/jobs", content=body, headers={"Content-Type": "application/json"})
            except httpx.TransportError as exc:
                problem = exc
                log.warning("http worker %s: submitting job %s failed (%s: %s); attempt %d of %d", self.name,
                            spec.job_id, type(exc).__name__, exc, attempt + 1, self.submit_attempts)
                continue
            if response.status_code in (200, 202):
                return None
            if response.status_code == 503:
                raise BackendBusy(f"the worker at {self.url} is busy: {_error_text(response)}")
            if response.status_code == 401:
                self._observe(False, f"the worker at {self.url} refused the endpoint's secret")
                raise BackendError(f"the worker at {self.url} refused the endpoint's secret")
            if response.status_code == 413:  # its inputs (init images, ControlNet units) exceed the worker's limit
                return Failed(job_id=spec.job_id, kind="bad_request",
                              message=f"the job is too large for the worker at {self.url}: {_error_text(response)}")
            refused = _error_body(response)
            if response.status_code == 400 and refused.get("error") == "bad_request":  # the request itself
                return Failed(job_id=spec.job_id, kind="bad_request", message=str(refused.get("message", "")),
                              field=refused.get("field") if isinstance(refused.get("field"), str) else None)
            if response.status_code in (400, 422):
                return Failed(job_id=spec.job_id, kind="internal",
                              message=f"the worker at {self.url} cannot read this job (is it another version?): "
                                      f"{_error_text(response)}")
            raise BackendError(f"the worker at {self.url} answered HTTP {response.status_code} to a submit: "
                               f"{_error_text(response)}")
        reason = f"the worker at {self.url} could not be reached: {type(problem).__name__}: {problem}"
        self._observe(False, reason)
        raise BackendError(reason)

    def _job_command(self, job_id: str, command: str) -> bool:
        with self._lock:
            if job_id not in self._held:
                return False
        try:
            response = self._call("POST", f"/v1/jobs/{quote(job_id, safe='')}/{command}")
        except (httpx.HTTPError, BackendError) as exc:
            log.warning("http worker %s: %s of job %s did not reach the worker: %s", self.name, command, job_id, exc)
            return command == "cancel"  # the job is still ours: a lost worker ends it anyway
        if response.status_code != 200:
            log.warning("http worker %s: %s of job %s answered HTTP %d: %s", self.name, command, job_id,
                        response.status_code, _error_text(response))
            return False
        try:
            return bool(response.json().get("ok"))
        except (ValueError, AttributeError):
            return False

    # -- following a job ---------------------------------------------------------------------------------------
    def _follow(self, link: _Link) -> None:
        """Forward the job's events until its terminal one; reconnect on dropped links; give up after grace."""
        delay, problem, first = self.reconnect_delay, "", True
        while not self._stopping:
            heard_before = link.heard
            try:
                terminal = self._read_events(link, reconnect=not first)
            except _JobUnknown:
                terminal = Failed(job_id=link.job_id, kind="interrupted",
                                  message=f"the worker at {self.url} no longer knows the job (it restarted or "
                                          "dropped it)")
            except _BadStream as exc:
                terminal = Failed(job_id=link.job_id, kind="internal", message=str(exc))
            except Exception as exc:  # noqa: BLE001 - any transport failure: reconnect (or stop quietly)
                if self._stopping:
                    return
                if not isinstance(exc, httpx.HTTPError | BackendError | OSError):
                    log.exception("http worker %s: following job %s failed", self.name, link.job_id)
                terminal, problem = None, f"{type(exc).__name__}: {exc}"
            first = False
            if terminal is not None:
                self._finish(link.job_id, terminal, forget=True)
                return
            if self._stopping:
                return
            if link.heard > heard_before:
                delay = self.reconnect_delay  # it was talking: a fresh drop, start backing off again
            silent = time.monotonic() - link.heard
            if silent > self.grace_seconds:
                self._finish(link.job_id, Failed(
                    job_id=link.job_id, kind="interrupted",
                    message=f"lost the worker at {self.url} mid-job: nothing heard for {silent:.0f}s "
                            f"({problem or 'the stream ended'})"), forget=False)
                return
            log.info("http worker %s: the event stream of job %s dropped (%s); reconnecting after seq %d",
                     self.name, link.job_id, problem or "it ended early", link.last_seq)
            self._wake.wait(delay)
            delay = min(delay * 2, 2.0)

    def _read_events(self, link: _Link, *, reconnect: bool) -> Event | None:
        """One connection to the job's event stream; the terminal event, or None when the stream dropped."""
        job = quote(link.job_id, safe="")
        if reconnect:  # the result may be ready: fetch it rather than replay the stream
            status = self._call("GET", f"/v1/jobs/{job}", timeout=min(5.0, self.timeout_seconds))
            if status.status_code == 404:
                raise _JobUnknown()
            if status.status_code == 200:
                link.heard = time.monotonic()
                done = status.json()
                if done.get("done") and done.get("terminal"):
                    return self._decode(link, done["terminal"])
        timeout = httpx.Timeout(self.timeout_seconds, read=self.heartbeat_timeout)
        client = self._client
        if client is None or client.is_closed:
            raise BackendError(f"backend {self.name!r} is not running")
        with client.stream("GET", f"/v1/jobs/{job}/events", params={"after": link.last_seq},
                           timeout=timeout) as response:
            if response.status_code == 404:
                raise _JobUnknown()
            if response.status_code != 200:
                response.read()
                raise BackendError(f"the event stream answered HTTP {response.status_code}: {_error_text(response)}")
            link.response = response
            link.heard = time.monotonic()
            for line in response.iter_lines():
                if self._stopping:
                    return None
                link.heard = time.monotonic()
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                    if message.get("heartbeat"):
                        continue
                    seq, data = int(message["seq"]), message["event"]
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise _BadStream(f"the worker at {self.url} sent an unreadable stream line: {exc}") from None
                if seq <= link.last_seq:
                    continue  # already forwarded before a reconnect
                event = self._decode(link, data)
                link.last_seq = seq
                if isinstance(event, TERMINAL_EVENTS):
                    return event
                self._emit(event)
        return None

    def _decode(self, link: _Link, data: Any) -> Event:
        try:
            event = event_from_dict(data)
        except (MessageError, TypeError, AttributeError) as exc:
            raise _BadStream(f"the worker at {self.url} sent an event this studio cannot read: {exc}") from None
        if event.job_id != link.job_id:
            raise _BadStream(f"the worker at {self.url} sent an event of job {event.job_id} on job "
                             f"{link.job_id}'s stream")
        if isinstance(event, Started):
            return Started(job_id=event.job_id, worker=f"{self.name}/{event.worker}" if event.worker else self.name)
        return event

    def _finish(self, job_id: str, terminal: Event, *, forget: bool) -> None:
        """Give the slot back, then report ``terminal`` (once: ``stop`` may have reported the job already),
        then let the worker drop the job's buffer."""
        with self._lock:
            link = self._held.pop(job_id, None)
        if link is None:
            return
        self._emit(terminal)
        if forget:
            try:
                self._call("DELETE", f"/v1/jobs/{quote(job_id, safe='')}", timeout=min(5.0, self.timeout_seconds))
            except (httpx.HTTPError, BackendError) as exc:
                log.info("http worker %s: could not drop job %s's buffer (it expires anyway): %s", self.name,
                         job_id, exc)

    def _emit(self, event: Event) -> None:
        deliver(self._sink, event, self.name)


def create(config: BackendConfig) -> HttpWorkerBackend:
    from deploy.backends.options import parse_options, plain_options

    return HttpWorkerBackend(config.name, **plain_options(parse_options("http", config.options)))
