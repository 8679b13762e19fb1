"""Job inputs live in the asset store: the row holds references, readers that echo the request give it back as
sent, a refused submit leaves no blob, deleting a job deletes its inputs, the sweep removes orphans, the quota
counts them, and rows written the old way (inline base64) still run."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deploy.backends.messages import JobSpec
from tests.conftest import ADMIN_PASSWORD, login
from tests.fixtures.studio_models import ModelStudio
from tests.jobs.conftest import empty_queue, txt2img
from webapp.records import Job, JobMode, JobStatus
from webapp.services.errors import Throttled, Unavailable
from webapp.services.jobs.inputs import MissingInput


@pytest.fixture(scope="module")
def cn_studio(shared_fake_studio) -> ModelStudio:
    """The module's fake-backend studio with a ControlNet registered (the fake backend ignores the units)."""
    from tests.tiny import controlnets
    from tests.tiny.fixtures import tiny_files

    root = shared_fake_studio.studio.settings.data_dir / "cn-files"
    root.mkdir(exist_ok=True)
    path = controlnets.write_diffusers_file(root / "cn15.safetensors",
                                            controlnets.tiny_controlnet(tiny_files().pipeline("sd15").unet))
    shared_fake_studio.registry.register_file(actor=shared_fake_studio.admin, path=path, declared_type="controlnet",
                                              name="cn15")
    return shared_fake_studio


@pytest.fixture
def studio(cn_studio) -> Iterator[ModelStudio]:
    yield cn_studio
    empty_queue(cn_studio)


def _png(color: int | tuple[int, int, int], size: int = 64, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (1, 2, 3)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


INIT, MASK, HINT = _png((200, 10, 10)), _png(255, mode="L"), _jpeg()


def _inpaint_request() -> dict[str, Any]:
    """Every image slot: a data-URI init image, a bare mask, a unit image (JPEG) + the init image again as a
    paired [image, mask] unit, and a disabled unit whose image is never parsed."""
    return txt2img(
        init_images=["data:image/png;base64," + _b64(INIT)], mask=_b64(MASK), denoising_strength=0.5,
        alwayson_scripts={"ControlNet": {"args": [
            {"enabled": True, "module": "none", "model": "cn15", "input_image": _b64(HINT)},
            {"enabled": False, "image": "not even base64"},
            {"enabled": True, "module": "none", "model": "cn15", "image": [_b64(INIT), _b64(MASK)]},
        ]}})


def _row(studio: ModelStudio, job_id: str) -> Job:
    with studio.db.read() as s:
        return s.get(Job, job_id)


def _inputs(studio: ModelStudio, job_id: str = "") -> dict[str, bytes]:
    store = studio.store
    found = {}
    for blob in store.list(f"inputs/{job_id}/" if job_id else "inputs/"):
        with store.open(blob.key) as handle:
            found[blob.key] = handle.read()
    return found


def test_the_row_references_inputs_stored_once_each_in_their_own_format(studio):
    request = _inpaint_request()
    job = studio.jobs.submit(actor=studio.admin, mode="img2img", request=request)
    assert job.mode == JobMode.INPAINT
    row = _row(studio, job.id)
    prefix = f"inputs/{job.id}/"
    assert _inputs(studio, job.id) == {f"{prefix}0.png": INIT, f"{prefix}1.png": MASK, f"{prefix}2.jpg": HINT}, \
        "the bytes as sent, one blob per distinct image"
    stored = json.loads(row.request_json)
    assert stored["init_images"] == [f"data:image/png;base64,store:{prefix}0.png"]
    assert stored["mask"] == f"store:{prefix}1.png"
    units = stored["alwayson_scripts"]["ControlNet"]["args"]
    assert units[0]["input_image"] == f"store:{prefix}2.jpg"
    assert units[1]["image"] == "not even base64", "a disabled unit is kept as sent"
    assert units[2]["image"] == [f"store:{prefix}0.png", f"store:{prefix}1.png"]
    assert _b64(INIT) not in row.request_json and _b64(INIT) not in (row.engine_request_json or "")
    assert row.stored_bytes == len(row.request_json) + len(row.engine_request_json) + len(INIT + MASK + HINT)

    echoed = studio.jobs.submitted_request(row)
    assert echoed == request, "readers get the request exactly as sent"


def test_readers_that_echo_the_request_give_it_as_sent(studio):
    from webapp.ui.job_views import curl_command

    request = _inpaint_request()
    job = studio.jobs.submit(actor=studio.admin, mode="img2img", request=request)
    studio.jobs.wait(actor=studio.admin, job_id=job.id, timeout=30)
    with TestClient(studio.app, follow_redirects=False) as client:
        login(client, "admin", ADMIN_PASSWORD)
        detail = client.get(f"/api/v1/jobs/{job.id}").json()
    assert detail["request"] == request
    row = studio.jobs.get(actor=studio.admin, job_id=job.id)
    curl = curl_command(row, studio.jobs.submitted_request(row), "http://studio")
    assert _b64(HINT) in curl and "store:" not in curl, "History's curl replays the images themselves"


def test_the_job_runs_with_the_bytes_and_deleting_it_deletes_its_inputs(studio, monkeypatch):
    backend = studio.jobs.backend("local")
    seen: list[JobSpec] = []
    submit = backend.submit
    monkeypatch.setattr(backend, "submit", lambda spec: (seen.append(spec), submit(spec))[1])
    job = studio.jobs.submit(actor=studio.admin, mode="img2img", request=_inpaint_request())
    done = studio.jobs.wait(actor=studio.admin, job_id=job.id, timeout=30)
    assert done.status == JobStatus.SUCCEEDED, done.error
    (spec,) = seen
    assert spec.request.init_images == (INIT,) and spec.request.mask == MASK
    assert [(u.image, u.mask) for u in spec.controlnet_units] == [(HINT, None), (INIT, MASK)]
    assert JobSpec.from_json(spec.to_json()) == spec, "base64 on the wire only, the same values back"

    studio.jobs.delete(actor=studio.admin, job_id=job.id)
    assert _inputs(studio, job.id) == {}
    assert all(not studio.store.exists(key) for key in done.image_keys)


def test_a_refused_submit_leaves_no_blobs(studio, monkeypatch):
    before = _inputs(studio)

    def full(job: Job, **_: Any) -> Job:  # enqueue(job, admit=...) since role quotas
        raise Throttled("full", retry_after=1)

    monkeypatch.setattr(studio.jobs.queue, "enqueue", full)
    with pytest.raises(Throttled):
        studio.jobs.submit(actor=studio.admin, mode="img2img", request=_inpaint_request())
    assert _inputs(studio) == before
    monkeypatch.undo()

    store, put, calls = studio.store, studio.store.put, []

    def failing_put(key: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(key)
        if len(calls) == 2:
            from deploy.storage import StorageError

            raise StorageError("disk full")
        return put(key, *args, **kwargs)

    monkeypatch.setattr(store, "put", failing_put)
    with pytest.raises(Unavailable) as refused:
        studio.jobs.submit(actor=studio.admin, mode="img2img", request=_inpaint_request())
    assert refused.value.status == 503 and "disk full" in refused.value.message
    monkeypatch.undo()
    assert _inputs(studio) == before, "the blob written before the failure is gone"
    assert studio.jobs.list_jobs(actor=studio.admin)[1] == 0, "and there is no row"

    bad = _inpaint_request() | {"mask": _b64(_png(255, size=32, mode="L"))}
    with pytest.raises(Exception, match="does not match the init image size"):
        studio.jobs.submit(actor=studio.admin, mode="img2img", request=bad)
    assert _inputs(studio) == before


def test_the_sweep_removes_inputs_without_a_row_once_they_are_old(studio):
    live = studio.jobs.submit(actor=studio.admin, mode="img2img", request=_inpaint_request())
    studio.store.put("inputs/0123456789abcdef0123456789abcdef/0.png", io.BytesIO(INIT), content_type="image/png")
    assert studio.jobs.purge_orphan_images() == 0, "young inputs may belong to a submit still in flight"
    assert studio.jobs.purge_orphan_images(input_grace=timedelta(0)) == 1
    assert list(_inputs(studio)) == list(_inputs(studio, live.id)) and len(_inputs(studio, live.id)) == 3


def test_a_row_written_the_old_way_still_runs_and_echoes(studio, monkeypatch):
    """Before inputs moved to the store a row held the request with inline base64 and no engine form."""
    request = txt2img(init_images=[_b64(INIT)], denoising_strength=0.5)
    job = Job(owner_id=studio.admin.id, owner_name="admin", mode=JobMode.IMG2IMG, endpoint="local",
              request_json=json.dumps(request), models_json=_row_models(studio), job_count=1)
    backend = studio.jobs.backend("local")
    seen: list[JobSpec] = []
    submit = backend.submit
    monkeypatch.setattr(backend, "submit", lambda spec: (seen.append(spec), submit(spec))[1])
    studio.jobs.queue.enqueue(job)
    studio.jobs._dispatchers["local"].wake()
    done = studio.jobs.wait(actor=studio.admin, job_id=job.id, timeout=30)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert seen[0].request.init_images == (INIT,)
    assert studio.jobs.submitted_request(done) == request


def _row_models(studio: ModelStudio) -> str:
    """The models column of a job the service resolved (a real checkpoint for the old-style row)."""
    prepared = studio.jobs.resolver.prepare(actor=studio.admin, mode="txt2img", request=txt2img())
    return json.dumps(prepared.models.to_dict())


def test_a_missing_input_is_named_and_references_name_only_the_job_s_own_inputs(studio):
    job = studio.jobs.submit(actor=studio.admin, mode="img2img", request=_inpaint_request())
    row = _row(studio, job.id)
    studio.jobs.wait(actor=studio.admin, job_id=job.id, timeout=30)
    studio.store.delete(f"inputs/{job.id}/2.jpg")
    with pytest.raises(MissingInput, match=f"inputs/{job.id}/2.jpg"):
        studio.jobs.inputs.load(row)
    echoed = studio.jobs.submitted_request(row)
    assert echoed["alwayson_scripts"]["ControlNet"]["args"][0]["input_image"] == f"store:inputs/{job.id}/2.jpg"

    other = Job(**{**row.model_dump(), "id": "f" * 32})
    assert studio.jobs.submitted_request(other)["mask"] == f"store:inputs/{job.id}/1.png", \
        "a row cannot read another job's inputs"
    with pytest.raises(Exception, match="not one of its input images"):
        studio.jobs.inputs.load(other)


def test_a_data_uri_without_base64_header_is_refused_naming_the_field(studio):
    from webapp.services.errors import InvalidInput

    with pytest.raises(InvalidInput) as refused:
        studio.jobs.submit(actor=studio.admin, mode="img2img", request=txt2img(init_images=["data:image/png,AAAA"]))
    assert refused.value.field == "init_images[0]"
    assert _inputs(studio) == {}
