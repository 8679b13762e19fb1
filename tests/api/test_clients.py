"""Request sequences of SillyTavern and Open WebUI (a1111-api.md §12) against a running studio.

Jobs run on the fake backend with a per-step delay so a generation is still running while the
client polls ``/progress`` and sends ``/interrupt`` — exactly what SillyTavern does on a disconnect.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from PIL import Image

from tests.api.conftest import ALICE, BOB
from tests.live import serve

LONG = {"steps": 150, "n_iter": 20, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def base_url(slow_studio) -> Iterator[str]:
    with serve(slow_studio.studio.app) as base:
        yield base


def _until(check: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def _in_background(fn: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    out: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def test_sillytavern_sequence(base_url, slow_studio):
    http = httpx.Client(base_url=base_url, auth=ALICE, timeout=120)
    # connect: ping, then the lists it fills its dropdowns with
    options = http.get("/sdapi/v1/options")
    assert options.status_code == 200 and "forge_preset" not in options.json()
    assert http.get("/sdapi/v1/upscalers").json()[0]["name"] == "None"
    assert all("name" in m for m in http.get("/sdapi/v1/latent-upscale-modes").json())
    assert [v["model_name"] for v in http.get("/sdapi/v1/sd-vae").json()]
    assert http.get("/sdapi/v1/sd-modules").status_code == 404  # Forge-only route: "404 fine"
    assert all("name" in s for s in http.get("/sdapi/v1/samplers").json())
    assert all("name" in s for s in http.get("/sdapi/v1/schedulers").json())
    title = http.get("/sdapi/v1/sd-models").json()[0]["title"]
    # set the model, then poll progress until the server is ready
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).status_code == 200
    for _ in range(10):
        state = http.get("/sdapi/v1/progress").json()
        if state["progress"] == 0 and state["state"]["job_count"] == 0:
            break
    else:
        raise AssertionError("never idle")
    # generate with SillyTavern's extra keys; it reads images[0]
    body = {"prompt": "a knight", "negative_prompt": "blurry", "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "steps": 4, "cfg_scale": 7, "width": 64, "height": 64, "seed": 11, "restore_faces": False,
            "enable_hr": False, "hr_upscaler": "Latent", "denoising_strength": 0.7, "hr_scale": 2,
            "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
            "do_not_save_samples": False, "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic",
                                                                "forge_additional_modules": []},
            "override_settings_restore_afterwards": True}
    generated = http.post("/sdapi/v1/txt2img", json=body)
    assert generated.status_code == 200, generated.text
    first = Image.open(io.BytesIO(base64.b64decode(generated.json()["images"][0])))
    assert first.size == (64, 64) and first.format == "PNG"
    # a long generation, then the user closes the tab: SillyTavern posts /interrupt
    thread, result = _in_background(lambda: http.post("/sdapi/v1/txt2img", json={**body, **LONG}))
    _until(lambda: http.get("/sdapi/v1/progress").json()["state"]["sampling_step"] > 1, "the job to sample")
    busy = http.get("/sdapi/v1/progress").json()
    assert busy["state"]["job_count"] == 20 and busy["state"]["sampling_steps"] == 150, busy
    assert busy["current_image"] is not None and busy["eta_relative"] >= 0
    assert Image.open(io.BytesIO(base64.b64decode(busy["current_image"]))).size == (32, 32)
    assert http.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    assert http.post("/sdapi/v1/interrupt").json() == {}
    thread.join(60)
    assert not thread.is_alive() and result[0].status_code == 200
    answer = result[0].json()
    assert answer["images"] == [] and "interrupted" in " ".join(json.loads(answer["info"])["warnings"])
    idle = http.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_open_webui_sequence(base_url, slow_studio):
    http = httpx.Client(base_url=base_url, auth=BOB, timeout=60)
    assert http.get("/sdapi/v1/options").status_code == 200  # "verify"
    models = http.get("/sdapi/v1/sd-models").json()
    assert models
    # set model: GET options, change one key, POST the whole dict back
    options = http.get("/sdapi/v1/options").json()
    options["sd_model_checkpoint"] = models[0]["model_name"]
    assert http.post("/sdapi/v1/options", json=options).status_code == 200
    assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[0]["title"]
    generated = http.post("/sdapi/v1/txt2img", json={"prompt": "a ship", "batch_size": 2, "width": 64, "height": 64,
                                                      "steps": 3})
    assert generated.status_code == 200, generated.text
    assert len(generated.json()["images"]) == 2
    info = json.loads(generated.json()["info"])
    assert len(info["all_seeds"]) == 2 and info["all_seeds"][1] == info["all_seeds"][0] + 1
    assert info["width"] == 64 and len(info["infotexts"]) == 2


def test_force_task_id_lets_a_client_follow_its_job(base_url):
    http = httpx.Client(base_url=base_url, auth=BOB, timeout=60)
    task = "task(studio-follow-1)"
    before = http.post("/internal/progress", json={"id_task": task, "id_live_preview": -1}).json()
    assert before["active"] is False and before["completed"] is False
    thread, result = _in_background(lambda: http.post("/sdapi/v1/txt2img", json={
        "prompt": "a tree", "force_task_id": task, **LONG}))
    _until(lambda: http.post("/internal/progress", json={"id_task": task}).json()["active"], "the task to run")
    _until(lambda: http.post("/internal/progress", json={"id_task": task}).json()["live_preview"] is not None,
           "a live preview")
    running = http.post("/internal/progress", json={"id_task": task, "id_live_preview": -1}).json()
    assert running["progress"] > 0 and running["live_preview"].startswith("data:image/png;base64,")
    # another user cannot follow it
    assert httpx.post(f"{base_url}/internal/progress", auth=ALICE, json={"id_task": task}).json()["active"] is False
    assert http.get("/sdapi/v1/progress").json()["current_task"] == task
    http.post("/sdapi/v1/interrupt")
    thread.join(60)
    assert json.loads(result[0].json()["info"])["task_id"] == task
    assert http.post("/internal/progress", json={"id_task": task}).json()["completed"] is True


def test_waiting_requests_do_not_block_others(base_url):
    """While one user's txt2img waits for its job, every other route keeps answering."""
    http = httpx.Client(base_url=base_url, auth=ALICE, timeout=60)
    thread, result = _in_background(lambda: http.post("/sdapi/v1/txt2img", json={"prompt": "a wall", **LONG}))
    _until(lambda: http.get("/sdapi/v1/progress").json()["progress"] > 0, "the job to run")
    other = httpx.Client(base_url=base_url, auth=BOB, timeout=10)
    for path in ("/sdapi/v1/options", "/sdapi/v1/sd-models", "/sdapi/v1/progress", "/api/v1/me"):
        assert other.get(path).status_code == 200, path
    http.post("/sdapi/v1/interrupt")
    thread.join(60)
    assert result[0].status_code == 200


def test_skip_drops_the_current_batch_and_interrupt_keeps_finished_ones(base_url):
    http = httpx.Client(base_url=base_url, auth=ALICE, timeout=120)
    body = {"prompt": "a lighthouse", "steps": 40, "n_iter": 3, "width": 64, "height": 64, "seed": 500}

    def in_batch(n: int) -> Callable[[], bool]:
        return lambda: http.get("/sdapi/v1/progress").json()["state"]["job_no"] == n

    thread, result = _in_background(lambda: http.post("/sdapi/v1/txt2img", json=body))
    _until(in_batch(1), "the second batch")
    assert http.post("/sdapi/v1/skip").status_code == 200
    thread.join(60)
    skipped = result[0].json()
    assert json.loads(skipped["info"])["all_seeds"] == [500, 502] and len(skipped["images"]) == 2

    thread, result = _in_background(lambda: http.post("/sdapi/v1/txt2img", json=body))
    _until(in_batch(1), "the second batch")
    assert http.post("/sdapi/v1/interrupt").json() == {}
    thread.join(60)
    interrupted = result[0]
    assert interrupted.status_code == 200
    info = json.loads(interrupted.json()["info"])
    assert info["all_seeds"] == [500] and len(interrupted.json()["images"]) == 1
    assert any("interrupted" in w and "1 finished image" in w for w in info["warnings"])


def test_interrupt_reaches_a_job_still_waiting_in_the_queue(base_url):
    alice = httpx.Client(base_url=base_url, auth=ALICE, timeout=120)
    bob = httpx.Client(base_url=base_url, auth=BOB, timeout=120)
    running, first = _in_background(lambda: alice.post("/sdapi/v1/txt2img", json={"prompt": "long", **LONG}))
    _until(lambda: alice.get("/sdapi/v1/progress").json()["progress"] > 0, "alice's job to run")
    waiting, second = _in_background(lambda: bob.post("/sdapi/v1/txt2img", json={"prompt": "queued", **LONG}))
    _until(lambda: bob.get("/sdapi/v1/progress").json()["state"]["job_count"] > 0, "bob's job to be queued")
    assert bob.get("/sdapi/v1/progress").json()["progress"] == 0  # still waiting behind alice's
    assert bob.post("/sdapi/v1/interrupt").json() == {}
    waiting.join(30)
    assert not waiting.is_alive() and second[0].status_code == 200 and second[0].json()["images"] == []
    assert alice.get("/sdapi/v1/progress").json()["progress"] > 0  # bob's interrupt left alice's job alone
    alice.post("/sdapi/v1/interrupt")
    running.join(60)
    assert first[0].status_code == 200
