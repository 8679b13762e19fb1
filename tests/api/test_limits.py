"""Request limits and input validation over HTTP, on both APIs: body size, prompt length, pixels and images
per job, decompression bombs, text that is not valid Unicode, and rows that hold it anyway."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest

from tests.api.conftest import ALICE, ApiStudio, api_studio
from tests.fixtures.images import bomb_png, png_b64

LIMITED = {"max_body_mb": 1, "max_prompt_chars": 500, "max_job_pixels": 256 * 256 * 4, "max_job_images": 8}
A1111_ERROR_KEYS = {"error", "detail", "body", "errors"}


@pytest.fixture(scope="module")
def limited(tmp_path_factory) -> Iterator[ApiStudio]:
    with api_studio(tmp_path_factory, backend="fake", **LIMITED) as s:
        yield s


def txt(**overrides) -> dict:
    body = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}
    body.update(overrides)
    return body


def job(client, request: dict, mode: str = "txt2img"):
    return client.post("/api/v1/jobs", auth=ALICE, json={"mode": mode, "request": request})


def jobs_of_alice(studio: ApiStudio) -> int:
    return studio.studio.jobs.list_jobs(actor=studio.user("alice"), limit=None)[1]


# -- S3: body size ------------------------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_refused_with_413_naming_body(limited):
    c, before = limited.client, jobs_of_alice(limited)
    padded = txt(comments={"pad": "x" * (1024 * 1024)})
    answer = job(c, padded)
    assert answer.status_code == 413 and answer.json()["field"] == "body" and "1 MB" in answer.json()["detail"]
    answer = c.post("/sdapi/v1/txt2img", auth=ALICE, json=padded)
    assert answer.status_code == 413 and set(answer.json()) >= A1111_ERROR_KEYS and answer.json()["field"] == "body"
    assert jobs_of_alice(limited) == before


def test_a_streamed_body_without_content_length_is_counted(limited):
    payload = json.dumps({"mode": "txt2img", "request": txt(comments={"pad": "x" * (1024 * 1024)})}).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(payload), 64 * 1024):
            yield payload[start:start + 64 * 1024]

    answer = limited.client.post("/api/v1/jobs", auth=ALICE, content=chunks(),
                                 headers={"content-type": "application/json"})
    assert answer.status_code == 413 and answer.json()["field"] == "body"
    small = json.dumps({"mode": "txt2img", "request": txt()}).encode()
    assert limited.client.post("/api/v1/jobs", auth=ALICE, content=iter([small]),
                               headers={"content-type": "application/json"}).status_code == 201


def test_model_upload_chunks_keep_their_own_limit(limited):
    c = limited.client
    size = 3 * 1024 * 1024
    created = c.post("/api/v1/uploads", auth=ALICE, json={"file_name": "big.safetensors", "size": size, "type": "lora"})
    assert created.status_code == 201, created.text
    upload_id = created.json()["id"]
    try:
        answer = c.put(f"/api/v1/uploads/{upload_id}", auth=ALICE, content=b"\0" * (2 * 1024 * 1024),
                       headers={"content-range": f"bytes 0-{2 * 1024 * 1024 - 1}/{size}"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["received"] == 2 * 1024 * 1024
    finally:
        c.delete(f"/api/v1/uploads/{upload_id}", auth=ALICE)


# -- S3: prompt length, pixels and images per job -------------------------------------------------------------------
@pytest.mark.parametrize(("request_fields", "field"), [
    ({"prompt": "x" * 501}, "prompt"),
    ({"enable_hr": True, "hr_negative_prompt": "x" * 501}, "hr_negative_prompt"),
    ({"width": 512, "height": 512, "batch_size": 2}, "batch_size"),
    ({"width": 256, "height": 256, "batch_size": 4, "enable_hr": True, "hr_scale": 1.5}, "hr_scale"),
    ({"n_iter": 5, "batch_size": 2}, "n_iter"),
])
def test_oversized_jobs_are_refused_on_both_apis_naming_the_field(limited, request_fields, field):
    c, before = limited.client, jobs_of_alice(limited)
    answer = job(c, txt(**request_fields))
    assert answer.status_code == 422 and answer.json()["field"] == field, answer.text
    answer = c.post("/sdapi/v1/txt2img", auth=ALICE, json=txt(**request_fields))
    assert answer.status_code == 422 and answer.json()["field"] == field, answer.text
    assert set(answer.json()) >= A1111_ERROR_KEYS
    assert jobs_of_alice(limited) == before


def test_an_infotext_longer_than_three_prompts_is_refused(limited):
    answer = limited.client.post("/sdapi/v1/txt2img", auth=ALICE, json=txt(infotext="x" * 1501))
    assert answer.status_code == 422 and answer.json()["field"] == "infotext", answer.text


# -- S7: decompression bombs ---------------------------------------------------------------------------------------
def test_decompression_bombs_are_refused_on_both_apis_and_in_png_info(limited):
    c, before = limited.client, jobs_of_alice(limited)
    bomb = base64.b64encode(bomb_png(30000, 30000)).decode("ascii")
    answer = c.post("/sdapi/v1/img2img", auth=ALICE, json=txt(init_images=[bomb]))
    assert answer.status_code == 422 and answer.json()["field"] == "init_images[0]", answer.text
    answer = c.post("/sdapi/v1/img2img", auth=ALICE, json=txt(init_images=[png_b64(64, 64)], mask=bomb))
    assert answer.status_code == 422 and answer.json()["field"] == "mask", answer.text
    answer = job(c, txt(init_images=[bomb]), mode="img2img")
    assert answer.status_code == 422 and answer.json()["field"] == "init_images[0]", answer.text
    assert jobs_of_alice(limited) == before
    answer = c.post("/sdapi/v1/png-info", auth=ALICE, json={"image": bomb})
    assert answer.status_code == 422 and answer.json()["field"] == "image", answer.text
    assert set(answer.json()) >= A1111_ERROR_KEYS


def test_an_input_image_over_the_jobs_pixel_limit_is_refused(limited):
    big = base64.b64encode(bomb_png(2048, 2048)).decode("ascii")
    answer = limited.client.post("/sdapi/v1/img2img", auth=ALICE, json=txt(init_images=[big]))
    assert answer.status_code == 422 and answer.json()["field"] == "init_images[0]", answer.text
    assert "2048x2048" in answer.json()["detail"]


# -- S8: text that is not valid Unicode -----------------------------------------------------------------------------
def test_a_lone_surrogate_is_refused_naming_the_field(limited):
    c, before = limited.client, jobs_of_alice(limited)
    raw = '{"mode": "txt2img", "request": {"prompt": "a \\ud800 fox", "steps": 2, "width": 64, "height": 64}}'
    answer = c.post("/api/v1/jobs", auth=ALICE, content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 422 and answer.json()["field"] == "prompt", answer.text
    raw = '{"prompt": "fox", "steps": 2, "width": 64, "height": 64, "override_settings": {"sd_vae": "\\udfff"}}'
    answer = c.post("/sdapi/v1/txt2img", auth=ALICE, content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 422 and answer.json()["field"] == "override_settings.sd_vae", answer.text
    assert jobs_of_alice(limited) == before


def test_a_lone_surrogate_in_a_typed_field_gets_a_422_not_a_500(limited):
    c = limited.client
    for path, raw, field in (("/api/v1/jobs", '{"mode": "\\ud800"}', "mode"),
                             ("/api/v1/jobs", '{"request": {}, "task_id": "\\udfff"}', "task_id"),
                             ("/api/v1/jobs", '{"request": {}, "endpoint": "\\udfff"}', "endpoint"),
                             ("/sdapi/v1/txt2img", '{"prompt": "\\ud800"}', "prompt")):
        answer = c.post(path, auth=ALICE, content=raw, headers={"content-type": "application/json"})
        assert answer.status_code == 422 and answer.json()["field"] == field, (path, answer.text)


def test_options_with_a_lone_surrogate_are_refused_naming_the_option(limited):
    for key in ("sd_model_checkpoint", "sd_vae"):
        answer = limited.client.post("/sdapi/v1/options", auth=ALICE, content=f'{{"{key}": "\\ud800"}}',
                                     headers={"content-type": "application/json"})
        assert answer.status_code == 422 and answer.json()["field"] == key, answer.text


def stored_row(studio: ApiStudio, **columns):
    """A failed job of alice's written straight into the table, as an older release or a hand edit left it."""
    from webapp.records import Job, JobMode, JobStatus

    alice = studio.user("alice")
    row = Job(owner_id=alice.id, owner_name=alice.username, mode=JobMode.TXT2IMG, endpoint="local",
              status=JobStatus.FAILED, error="crashed", **columns)
    with studio.studio.db.write() as s:
        s.add(row)
    return row


def readable_everywhere(studio: ApiStudio, job_id: str) -> dict:
    """GET, the list and the SSE stream all answer for the job; returns GET's body."""
    answer = studio.client.get(f"/api/v1/jobs/{job_id}", auth=ALICE)
    assert answer.status_code == 200, answer.text
    listed = studio.client.get("/api/v1/jobs", auth=ALICE)
    assert listed.status_code == 200 and job_id in [j["id"] for j in listed.json()["items"]]
    with studio.client.stream("GET", f"/api/v1/jobs/{job_id}/events", auth=ALICE) as events:
        assert events.status_code == 200 and "event: done" in events.read().decode()
    return answer.json()


def test_a_stored_row_with_a_lone_surrogate_stays_readable(limited):
    row = stored_row(limited, request_json='{"prompt": "a \\ud800 fox \\ud83e\\udd8a"}',
                     info_json='{"prompt": "\\udc00", "seed": 3}', warnings_json='["\\udfff!"]')
    try:
        body = readable_everywhere(limited, row.id)
        assert body["request"]["prompt"] == "a \ufffd fox \U0001f98a"
        assert body["info"] == {"prompt": "\ufffd", "seed": 3} and body["warnings"] == ["\ufffd!"]
    finally:
        limited.studio.jobs.delete(actor=limited.user("alice"), job_id=row.id)


def test_a_stored_row_with_broken_json_stays_readable(limited):
    row = stored_row(limited, request_json='{"prompt": "cut sh', info_json="[1, 2]", warnings_json="[1, 2",
                     timings_json='"not an object"')
    try:
        body = readable_everywhere(limited, row.id)
        assert body["request"] == {} and body["info"] is None and body["warnings"] == [] and body["timings"] == {}
        assert body["status"] == "failed" and body["error"] == "crashed"
    finally:
        limited.studio.jobs.delete(actor=limited.user("alice"), job_id=row.id)


# -- S9: override_settings and options ------------------------------------------------------------------------------
def test_override_settings_that_is_not_an_object_is_refused(limited):
    answer = job(limited.client, txt(override_settings="x"))
    assert answer.status_code == 422 and answer.json()["field"] == "override_settings", answer.text
    answer = limited.client.post("/sdapi/v1/txt2img", auth=ALICE, json=txt(override_settings="x"))
    assert answer.status_code == 422 and answer.json()["field"] == "override_settings", answer.text


@pytest.mark.parametrize("scripts", [{"ControlNet": "x"}, {"ControlNet": {"args": "x"}}, {"ControlNet": []}])
def test_alwayson_scripts_of_the_wrong_shape_are_refused(limited, scripts):
    answer = limited.client.post("/sdapi/v1/txt2img", auth=ALICE, json=txt(alwayson_scripts=scripts))
    assert answer.status_code == 422 and answer.json()["field"] == "alwayson_scripts", answer.text
