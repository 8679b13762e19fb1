"""UI handlers of the txt2img/img2img tabs, History and PNG Info, called as Gradio calls them."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
from gradio.utils import get_upload_folder
from starlette.requests import Request

from tests.jobs.conftest import add_user
from webapp.records import EndpointStatus
from webapp.ui.context import UiContext
from webapp.ui.generate_form import CLOUD_LABEL, LOCAL_LABEL
from webapp.ui.generate_tab import GenerateTab
from webapp.ui.pnginfo_tab import PngInfoTab


class Tabs:
    def __init__(self, studio: Any) -> None:
        ctx = UiContext(users=studio.users)
        self.txt2img = GenerateTab(ctx, jobs=studio.jobs, registry=studio.registry, mode="txt2img")
        self.img2img = GenerateTab(ctx, jobs=studio.jobs, registry=studio.registry, mode="img2img",
                                   senders=[self.txt2img])
        self.pnginfo = PngInfoTab(ctx, registry=studio.registry, target=self.txt2img)
        with gr.Blocks() as self.blocks, gr.Tabs():
            for tab in (self.txt2img, self.img2img, self.pnginfo):
                tab.build()


@pytest.fixture(scope="module")
def tabs(shared_fake_studio) -> Tabs:
    return Tabs(shared_fake_studio)


def req(user: Any) -> gr.Request:
    return gr.Request(username=user.username)


def form_values(tab: GenerateTab, **values: Any) -> dict[Any, Any]:
    """What Gradio hands the handler: every form widget's value (defaults, then ``values``)."""
    out = {component: getattr(component, "value", None) for component in tab.form.c.values()}
    for name, value in values.items():
        out[tab.form.c[name]] = value
    return out


def generate(tab: GenerateTab, user: Any, **values: Any) -> tuple[str, dict]:
    job_id, progress, *_ = tab.submit(form_values(tab, **values), req(user))
    assert 'data-status="queued"' in progress
    updates = list(tab.follow(job_id, req(user)))
    return job_id, updates[-1]


def test_choices_are_the_users_models_and_endpoints(fake_studio, tabs):
    title = fake_studio.models.checkpoint.title
    checkpoint, vae, endpoint, network, refiner, button, sampler, scheduler, upscaler = tabs.txt2img.load_choices(
        None, None, None, None, req(fake_studio.admin))
    assert "DPM++ 2M" in sampler["choices"] and "Karras" in scheduler["choices"] and "Latent" in upscaler["choices"]
    assert checkpoint["choices"] == [(title, title)] or checkpoint["choices"] == [title]
    assert checkpoint["value"] == title and endpoint["value"] == "local" and button["value"] == LOCAL_LABEL
    assert "tinyvae" in str(vae["choices"]) and "None" in str(refiner["choices"])
    assert {"LoRA: tinylora", "Embedding: tinyemb", "Hypernetwork: tinyhyper"} <= {
        c if isinstance(c, str) else c[0] for c in network["choices"]}
    assert tabs.txt2img.insert_network("a cat", "LoRA: tinylora") == "a cat, <lora:tinylora:1>"
    assert tabs.txt2img.insert_network("", "Embedding: tinyemb") == "tinyemb"
    assert tabs.txt2img.insert_network("x", "Hypernetwork: tinyhyper") == "x, <hypernet:tinyhyper:1>"


def test_generate_streams_progress_and_shows_images_through_the_authorised_route(fake_studio, tabs):
    title = fake_studio.models.checkpoint.title
    job_id, final = generate(tabs.txt2img, fake_studio.admin, prompt="a blue heron", checkpoint=title, steps=4,
                             width=64, height=64, seed=7, endpoint="local")
    t = tabs.txt2img
    assert f'src="/files/jobs/{job_id}/0.png"' in final[t.results]
    assert "gradio_api/file" not in final[t.results]
    assert "a blue heron" in final[t.infotext] and "Seed: 7" in final[t.infotext]
    assert final[t.last_seed] == 7 and 'data-status="succeeded"' in final[t.progress]
    job = fake_studio.jobs.get(actor=fake_studio.admin, job_id=job_id)
    assert job.request["override_settings"]["sd_model_checkpoint"] == title


def test_form_errors_are_gradio_errors(fake_studio, tabs):
    with pytest.raises(gr.Error, match="Choose a checkpoint"):
        tabs.txt2img.submit(form_values(tabs.txt2img, checkpoint=None), req(fake_studio.admin))
    with pytest.raises(gr.Error, match="`steps` must be between"):
        tabs.txt2img.submit(form_values(tabs.txt2img, checkpoint=fake_studio.models.checkpoint.title, steps=0),
                            req(fake_studio.admin))
    with pytest.raises(gr.Error, match="Add an image"):
        tabs.img2img.submit(form_values(tabs.img2img, checkpoint=fake_studio.models.checkpoint.title),
                            req(fake_studio.admin))


def test_img2img_inpaint_mask_comes_from_the_painted_layer(fake_studio, tabs):
    from PIL import Image, ImageDraw

    background = Image.new("RGBA", (64, 64), "red")
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((10, 10, 30, 30), fill=(255, 255, 255, 255))
    editor = {"background": background, "layers": [layer], "composite": background}
    t = tabs.img2img
    mode, request, _ = t.form.to_request(form_values(t, checkpoint=fake_studio.models.checkpoint.title,
                                                     image=editor, img_mode="inpaint", width=64, height=64))
    assert mode == "inpaint" and request["mask"] and request["init_images"]
    job_id, final = generate(t, fake_studio.admin, checkpoint=fake_studio.models.checkpoint.title, image=editor,
                             img_mode="inpaint", width=64, height=64, steps=3)
    assert fake_studio.jobs.get(actor=fake_studio.admin, job_id=job_id).mode == "inpaint"
    with pytest.raises(gr.Error, match="paint the area"):
        t.form.to_request(form_values(t, checkpoint="x", image={"background": background, "layers": []},
                                      img_mode="inpaint"))


def test_history_lists_selects_reproduces_and_deletes(fake_studio, tabs):
    admin = fake_studio.admin
    job_id, _ = generate(tabs.txt2img, admin, checkpoint=fake_studio.models.checkpoint.title, steps=3, seed=-1)
    h = tabs.txt2img.history
    type_choices = {t: [c[0] for c in tab.history.mode.choices] for t, tab in (("txt2img", tabs.txt2img),
                                                                              ("img2img", tabs.img2img))}
    assert type_choices == {"txt2img": ["Any", "txt2img"], "img2img": ["Any", "img2img", "inpaint"]}
    selected, summary, *_ = h.refresh(False, False, "Any", "Any", "Any", "Any", "", "", None, req(admin))
    titles = [c[0] if isinstance(c, tuple) else c for c in selected["choices"]]
    assert len(titles) == 1 and titles[0].endswith(f"-txt2img-succeeded-{job_id}") and summary == "1 of 1 job"
    images, infotext, details, index, _curl = h.select(job_id, req(admin))
    assert f"/files/jobs/{job_id}/0.png" in images and "Steps: 3" in infotext and job_id in details
    browser = Request({"type": "http", "scheme": "http", "method": "POST", "path": "/ui/gradio_api/queue/join",
                       "query_string": b"", "headers": [(b"host", b"studio.example:7860")]})
    curl = h.api(job_id, gr.Request(username="admin", request=browser))["value"]
    job = fake_studio.jobs.get(actor=admin, job_id=job_id)
    assert "curl -sS -X POST 'http://studio.example:7860/sdapi/v1/txt2img' -u 'USER:PASSWORD'" in curl
    assert f'"seed": {job.info["seed"]}' in curl, "the random seed is pinned to the one used"
    assert fake_studio.models.checkpoint.title in curl and "Authorization: Bearer" in curl
    empty, *_ = h.refresh(False, False, "img2img", "Any", "Any", "Any", "", "", None, req(admin))
    assert empty["choices"] == []
    with pytest.raises(gr.Error, match="From"):
        h.refresh(False, False, "Any", "Any", "Any", "Any", "last week", "", None, req(admin))
    h.delete(job_id, req(admin))
    assert fake_studio.jobs.list_jobs(actor=admin) == ([], 0)


def test_another_user_cannot_reach_a_job_through_the_ui(fake_studio, tabs):
    alice, bob = add_user(fake_studio, "alice"), add_user(fake_studio, "bob")
    job_id, _ = generate(tabs.txt2img, alice, checkpoint=fake_studio.models.checkpoint.title, steps=2, width=64,
                         height=64)
    for call in (lambda: tabs.txt2img.history.select(job_id, req(bob)),
                 lambda: tabs.txt2img.history.api(job_id, req(bob)),
                 lambda: tabs.txt2img.history.delete(job_id, req(bob)),
                 lambda: tabs.txt2img.cancel(job_id, req(bob)),
                 lambda: tabs.img2img.receive(job_id, 0, req(bob)),
                 lambda: list(tabs.txt2img.follow(job_id, req(bob)))):
        with pytest.raises(gr.Error, match="no job"):
            call()
    selected, *_ = tabs.txt2img.history.refresh(True, True, "Any", "Any", "Any", "Any", "", "", None, req(bob))
    assert selected["choices"] == []
    image = tabs.img2img.receive(job_id, 0, req(alice))[tabs.img2img.form.c["image"]]
    assert image.size == (64, 64)


def test_send_to_img2img_and_png_info_to_txt2img(fake_studio, tabs, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # handlers read files Gradio received, from its folder
    admin = fake_studio.admin
    job_id, _ = generate(tabs.txt2img, admin, checkpoint=fake_studio.models.checkpoint.title, steps=5, seed=42,
                         prompt="a tiny lighthouse", width=64, height=64)
    png = fake_studio.jobs.image(actor=admin, job_id=job_id, index=0)
    path = tmp_path / "dropped.png"
    path.write_bytes(png)
    preview, text, parsed, state = tabs.pnginfo.read(str(path), req(admin))
    assert "data:image/png;base64," in preview and text.startswith("a tiny lighthouse")
    assert parsed["Seed"] == "42" and state["checkpoint"] == fake_studio.models.checkpoint.title
    updates = tabs.pnginfo.send(state)
    c = tabs.txt2img.form.c
    assert updates[c["prompt"]] == "a tiny lighthouse" and updates[c["seed"]] == 42 and updates[c["steps"]] == 5
    assert updates[c["checkpoint"]] == fake_studio.models.checkpoint.title
    assert c["refiner_checkpoint"] not in updates  # no refiner in that infotext
    # an SDXL infotext with a refiner: the refiner (by its hash) and the switch come along
    from pipelines.infotext import encode_image

    refiner = fake_studio.models.checkpoint
    text = (f"a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, Model: x, "
            f"Refiner: renamed-since [{refiner.autov2}], Refiner switch at: 0.7, Version: v1.10.1")
    from PIL import Image

    xl = tmp_path / "xl.png"
    xl.write_bytes(encode_image(Image.new("RGB", (8, 8)), text, "png"))
    state = tabs.pnginfo.read(str(xl), req(admin))[3]
    updates = tabs.pnginfo.send(state)
    assert updates[c["refiner_checkpoint"]] == refiner.title and updates[c["refiner_switch_at"]] == 0.7
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert tabs.pnginfo.read(str(plain), req(admin))[3] is None
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(gr.Error, match="not a readable image"):
        tabs.pnginfo.read(str(junk), req(admin))
    with pytest.raises(gr.Error, match="Drop an image"):
        tabs.pnginfo.send(None)


def test_the_button_reads_generate_on_cloud_for_a_remote_endpoint(fake_studio, tabs):
    fake_studio.jobs.endpoints.ensure(name="cloud", kind="fake", remote=True, capabilities={"samplers": ["Euler a"]},
                                      config={}, is_default=False, status=EndpointStatus.IN_SERVICE)
    try:
        button, sampler, *_ = tabs.txt2img.endpoint_changed("cloud", req(fake_studio.admin))
        assert button["value"] == CLOUD_LABEL
        assert sampler["choices"] == ["Euler a"], "the endpoint's own samplers, not this server's"
        button, sampler, *_ = tabs.txt2img.endpoint_changed("local", req(fake_studio.admin))
        assert button["value"] == LOCAL_LABEL and "DPM++ 2M SDE" in sampler["choices"]
        *_, button, sampler, _, _ = tabs.txt2img.load_choices(None, None, "cloud", None, req(fake_studio.admin))
        assert button["value"] == CLOUD_LABEL and sampler["choices"] == ["Euler a"]
    finally:
        with fake_studio.db.write() as s:
            from webapp.records import Endpoint

            s.delete(s.get(Endpoint, "cloud"))


def test_progress_html_while_running():
    from datetime import UTC, datetime

    from webapp.records import JobStatus
    from webapp.services.jobs import ProgressSnapshot
    from webapp.ui.job_views import progress_html

    snap = ProgressSnapshot(job_id="j", status=JobStatus.RUNNING, mode="txt2img", task_id=None, step=5, total=20,
                            job_no=1, job_count=2, progress=0.625, eta=75.0, preview_png=b"\x89PNG fake",
                            queue_position=0, started_at=None, created_at=datetime.now(UTC))
    html = progress_html(snap)
    assert "Step 5/20 · pass 2/2 · 62% · ETA 1:15" in html and "width:62.5%" in html
    assert 'src="data:image/png;base64,' in html
    assert progress_html(None, note="x<y") == '<div class="studio-progress">x&lt;y</div>'


def test_limits_and_bombs_are_gradio_errors_naming_the_problem(fake_studio, tabs):
    from tests.fixtures.images import bomb_png

    title = fake_studio.models.checkpoint.title
    with pytest.raises(gr.Error, match="`prompt` is 10,001 characters long; at most 10,000"):
        tabs.txt2img.submit(form_values(tabs.txt2img, checkpoint=title, prompt="x" * 10_001), req(fake_studio.admin))
    bomb = Path(get_upload_folder()) / f"test-{uuid.uuid4().hex}" / "bomb.png"  # handlers read uploads only
    bomb.parent.mkdir(parents=True)
    bomb.write_bytes(bomb_png(30000, 30000))
    with pytest.raises(gr.Error, match="too large to decode safely"):
        tabs.pnginfo.read(str(bomb), req(fake_studio.admin))
