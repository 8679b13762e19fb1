"""The ``Backend`` contract, asserted identically on fake, local, and the http worker (fake and local inside).

What the dispatcher relies on: slots are counted and a full backend refuses with ``BackendBusy``; a job
reports ``Started``, then ``Progress``, then exactly one terminal event; cancel stops a running job within
a step (``Cancelled``); skip drops the current batch and goes on; failures carry their kind; ``stop``
reports running jobs ``Failed(kind="interrupted")`` so the queue runs them again.
"""

from __future__ import annotations

import io

import pytest

from deploy.backends.base import STOPPED_MESSAGE, BackendBusy, BackendError
from deploy.backends.messages import Cancelled, Failed, Progress, Started, Succeeded
from tests.backends.conftest import BackendCase


def test_capabilities_describe_the_backend(backend_case: BackendCase):
    backend = backend_case.backend
    caps = backend.capabilities()
    assert backend.is_configured()
    assert caps.slots == 1 and caps.remote is backend_case.remote
    assert "txt2img" in caps.modes and "checkpoint" in caps.model_types and caps.devices
    assert set(caps.to_dict()) == {"modes", "slots", "remote", "previews", "devices", "model_types", "samplers",
                                   "schedulers", "upscalers", "kinds", "extra"}
    assert "generate" in caps.kinds
    assert "Euler a" in caps.samplers and "Karras" in caps.schedulers and "Latent" in caps.upscalers
    assert backend.health() == (True, None)
    assert backend.kind in backend.describe()


def test_a_job_reports_started_progress_then_one_terminal_event(backend_case: BackendCase):
    from PIL import Image

    backend, sink = backend_case.backend, backend_case.sink
    assert backend.free_slots() == 1
    backend.submit(backend_case.spec("ok", steps=4, seed=5))
    done = sink.wait_terminal("ok")
    events = sink.for_job("ok")
    assert isinstance(events[0], Started) and events[0].worker
    assert isinstance(done, Succeeded) and events[-1] is done, events
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress and all(isinstance(e, Progress) for e in events[1:-1])
    assert [p.step for p in progress] == sorted(p.step for p in progress) and progress[-1].total == 4
    assert done.seeds == (5,) and "Seed: 5" in done.infotexts[0]
    with Image.open(io.BytesIO(done.images[0])) as image:
        assert image.size == (64, 64) and image.info["parameters"] == done.infotexts[0]
    assert backend.free_slots() == 1, "the slot is free once the terminal event arrived"


def test_a_full_backend_refuses_with_busy(backend_case: BackendCase):
    backend, sink = backend_case.backend, backend_case.sink
    backend.submit(backend_case.spec("long", steps=backend_case.long_steps))
    assert backend.free_slots() == 0
    with pytest.raises(BackendBusy):
        backend.submit(backend_case.spec("second"))
    assert backend.cancel("long")
    assert isinstance(sink.wait_terminal("long"), Cancelled)
    assert sink.for_job("second") == []
    assert backend.free_slots() == 1


def test_cancel_stops_a_running_job_within_a_step(backend_case: BackendCase):
    backend, sink = backend_case.backend, backend_case.sink
    backend.submit(backend_case.spec("victim", steps=backend_case.long_steps))
    sink.wait_progress("victim")
    assert backend.cancel("victim") is True
    assert backend.cancel("not-held") is False
    terminal = sink.wait_terminal("victim")
    assert isinstance(terminal, Cancelled) and terminal.images == ()
    steps = [e.step for e in sink.of(Progress, "victim")]
    assert max(steps) < backend_case.long_steps // 2, "it stopped long before the end"
    assert len(sink.of((Succeeded, Failed, Cancelled), "victim")) == 1


def test_skip_drops_the_current_batch_and_goes_on(backend_case: BackendCase):
    backend, sink = backend_case.backend, backend_case.sink
    backend.submit(backend_case.spec("skipped", steps=backend_case.long_steps // 4, n_iter=2, seed=20))
    sink.wait_progress("skipped")
    assert backend.skip("skipped") is True
    terminal = sink.wait_terminal("skipped")
    assert isinstance(terminal, Succeeded), terminal
    assert terminal.seeds == (21,), "the first batch (seed 20) was dropped, the second one ran"
    assert backend.skip("not-held") is False


def test_failures_carry_their_kind(backend_case: BackendCase):
    backend, sink = backend_case.backend, backend_case.sink
    for n, failure in enumerate(backend_case.failures):
        job_id = f"fail-{n}"
        backend.submit(backend_case.spec(job_id, missing_checkpoint=failure.missing_checkpoint, **failure.request))
        terminal = sink.wait_terminal(job_id)
        assert isinstance(terminal, Failed) and terminal.kind == failure.kind, (failure.label, terminal)
        assert terminal.message
        assert backend.free_slots() == 1, "a failed job gives its slot back"
    bad = [f for f in backend_case.failures if f.kind == "bad_request" and f.request.get("sampler_name")]
    for failure in bad:
        terminal = sink.of(Failed, f"fail-{backend_case.failures.index(failure)}")[0]
        assert terminal.field == "sampler_name"


def test_stop_reports_running_jobs_interrupted(backend_case: BackendCase):
    backend, sink = backend_case.backend, backend_case.sink
    backend.submit(backend_case.spec("running", steps=backend_case.long_steps))
    sink.wait_progress("running")
    backend.stop()
    terminal = sink.wait_terminal("running", 5)
    assert terminal == Failed(job_id="running", message=STOPPED_MESSAGE, kind="interrupted")
    assert len(sink.of((Succeeded, Failed, Cancelled), "running")) == 1
    assert backend.free_slots() == 0
    with pytest.raises(BackendError):
        backend.submit(backend_case.spec("after"))


def test_release_memory_leaves_the_backend_ready_for_the_next_job(backend_case: BackendCase):
    backend, sink = backend_case.backend, backend_case.sink
    backend.submit(backend_case.spec("before", steps=2))
    assert isinstance(sink.wait_terminal("before"), Succeeded)
    backend.release_memory()
    backend.submit(backend_case.spec("after", steps=2))
    after = sink.wait_terminal("after")
    assert isinstance(after, Succeeded) and after.seeds == sink.of(Succeeded, "before")[0].seeds
