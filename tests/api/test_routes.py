"""Every A1111 route answers, lists only what really exists, and fails in A1111's error shape."""

from __future__ import annotations

import base64
import io
import json

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.api.conftest import ADMIN, ALICE, BOB
from tests.fixtures.studio_models import CHECKPOINT, EMBEDDING, HYPERNETWORK, LORA, VAE

A1111_ERROR_KEYS = {"error", "detail", "body", "errors"}


def test_model_lists_show_the_registered_models(fake_studio):
    c, m = fake_studio.client, fake_studio.models
    sd = c.get("/sdapi/v1/sd-models", auth=ALICE).json()
    assert [x["title"] for x in sd] == [m.checkpoint.title]
    assert sd[0]["model_name"] == CHECKPOINT and sd[0]["hash"] == m.checkpoint.autov2
    assert sd[0]["sha256"] == m.checkpoint.sha256 and sd[0]["filename"]
    assert [v["model_name"] for v in c.get("/sdapi/v1/sd-vae", auth=ALICE).json()] == [VAE]
    loras = c.get("/sdapi/v1/loras", auth=ALICE).json()
    assert [x["name"] for x in loras] == [LORA] and loras[0]["alias"] == LORA
    assert loras[0]["metadata"].get("ss_network_dim") == "4"
    assert [h["name"] for h in c.get("/sdapi/v1/hypernetworks", auth=ALICE).json()] == [HYPERNETWORK]
    embeddings = c.get("/sdapi/v1/embeddings", auth=ALICE).json()
    assert set(embeddings) == {"loaded", "skipped"}
    everything = {**embeddings["loaded"], **embeddings["skipped"]}
    assert list(everything) == [EMBEDDING] and everything[EMBEDDING]["vectors"] == 2


def test_private_models_of_others_are_not_listed(fake_studio):
    from tests.tiny.fixtures import tiny_files

    alice = fake_studio.user("alice")
    path = tiny_files().checkpoint("sd15", extras=True)
    private = fake_studio.studio.models.register_file(actor=alice, path=path, declared_type="checkpoint",
                                                      name="alice-private", visibility="private")
    try:
        titles = lambda who: [x["title"] for x in fake_studio.client.get("/sdapi/v1/sd-models", auth=who).json()]  # noqa: E731
        assert private.title in titles(ALICE) and private.title in titles(ADMIN)
        assert private.title not in titles(BOB)
        refused = fake_studio.client.post("/sdapi/v1/options", auth=BOB, json={"sd_model_checkpoint": private.title})
        assert refused.status_code == 404 and refused.json()["field"] == "sd_model_checkpoint"
    finally:
        fake_studio.studio.models.delete(actor=alice, model_id=private.id)


def test_engine_lists(fake_studio):
    c = fake_studio.client
    samplers = c.get("/sdapi/v1/samplers", auth=ALICE).json()
    names = [s["name"] for s in samplers]
    assert "Euler a" in names and "DPM++ 2M" in names and "DPM fast" not in names
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    schedulers = c.get("/sdapi/v1/schedulers", auth=ALICE).json()
    assert {"automatic", "karras"} <= {s["name"] for s in schedulers}
    assert all({"name", "label", "aliases", "default_rho", "need_inner_model"} == set(s) for s in schedulers)
    upscalers = [u["name"] for u in c.get("/sdapi/v1/upscalers", auth=ALICE).json()]
    assert upscalers == ["None", "Lanczos", "Nearest"]
    latent = [u["name"] for u in c.get("/sdapi/v1/latent-upscale-modes", auth=ALICE).json()]
    assert "Latent" in latent and "Latent (nearest-exact)" in latent
    assert c.get("/sdapi/v1/scripts", auth=ALICE).json() == {"txt2img": [], "img2img": []}
    for path in ("prompt-styles", "face-restorers", "realesrgan-models", "script-info", "extensions"):
        assert c.get(f"/sdapi/v1/{path}", auth=ALICE).json() == [], path


def test_memory_and_cmd_flags(fake_studio):
    c = fake_studio.client
    memory = c.get("/sdapi/v1/memory", auth=ALICE).json()
    assert memory["ram"]["total"] > memory["ram"]["used"] > 0 and "cuda" in memory
    flags = c.get("/sdapi/v1/cmd-flags", auth=ALICE)
    assert flags.status_code == 200 and flags.json()["api"] is True
    text = flags.text.lower()
    assert "admin-password" not in text and "password" not in text.replace("hide_password", "")


def test_cmd_flags_never_show_secrets(make_settings):
    from pydantic import SecretStr

    from webapp.api.sdapi.options import cmd_flags

    settings = make_settings(database_url="postgresql+psycopg://studio:s3cret-pw@db.example/studio",
                             civitai_token=SecretStr("civitai-secret-token"), hf_token=SecretStr("hf-secret-token"))
    text = repr(cmd_flags(settings, admin=True))
    for secret in ("s3cret-pw", "civitai-secret-token", "hf-secret-token", "admin-password-for-tests"):
        assert secret not in text
    assert "db.example" in text


def test_refresh_routes_rescan_the_models_folder(fake_studio):
    c = fake_studio.client
    for path in ("refresh-checkpoints", "refresh-vae", "refresh-loras", "refresh-embeddings"):
        response = c.post(f"/sdapi/v1/{path}", auth=ALICE)
        assert response.status_code == 200 and response.json() is None, path


def test_unload_is_for_administrators_and_reload_is_answered(fake_studio):
    c = fake_studio.client
    refused = c.post("/sdapi/v1/unload-checkpoint", auth=ALICE)
    assert refused.status_code == 403 and set(refused.json()) >= A1111_ERROR_KEYS
    assert c.post("/sdapi/v1/unload-checkpoint", auth=ADMIN).json() == {}
    assert c.post("/sdapi/v1/reload-checkpoint", auth=ALICE).json() == {}


def _png(text: str | None, **extra: str) -> bytes:
    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    for key, value in extra.items():
        info.add_text(key, value)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_png_info_with_and_without_data_uri(fake_studio):
    text = ("a castle, <lora:tinylora:0.8>\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, "
            "CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: ae810daac1, Model: tiny-sd15")
    raw = base64.b64encode(_png(text, comment="hello")).decode()
    for image in (raw, "data:image/png;base64," + raw):
        answer = fake_studio.client.post("/sdapi/v1/png-info", auth=ALICE, json={"image": image}).json()
        assert answer["info"] == text and answer["items"] == {"comment": "hello"}
        params = answer["parameters"]
        assert params["Prompt"] == "a castle, <lora:tinylora:0.8>" and params["Negative prompt"] == "blurry"
        assert params["Size-1"] == "512" and params["Size-2"] == "768" and params["Seed"] == "1234"
        assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"
    plain = base64.b64encode(_png(None)).decode()
    assert fake_studio.client.post("/sdapi/v1/png-info", auth=ALICE, json={"image": plain}).json() == {
        "info": "", "items": {}, "parameters": {}}
    bad = fake_studio.client.post("/sdapi/v1/png-info", auth=ALICE, json={"image": "!!!not base64!!!"})
    assert bad.status_code == 422 and bad.json()["field"] == "image" and set(bad.json()) >= A1111_ERROR_KEYS


def test_error_shapes_and_statuses(fake_studio):
    c = fake_studio.client
    txt = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
    sampler = c.post("/sdapi/v1/txt2img", auth=ALICE, json={**txt, "sampler_name": "No Such Sampler"})
    assert sampler.status_code == 404 and sampler.json()["field"] == "sampler_name"
    assert set(sampler.json()) >= A1111_ERROR_KEYS and sampler.json()["body"] == ""
    model = c.post("/sdapi/v1/txt2img", auth=ALICE, json={**txt, "override_settings": {"sd_model_checkpoint": "nope"}})
    assert model.status_code == 404 and model.json()["field"] == "sd_model_checkpoint"
    typed = c.post("/sdapi/v1/txt2img", auth=ALICE, json={**txt, "steps": "many"})
    assert typed.status_code == 422 and typed.json()["field"] == "steps"
    assert typed.json()["error"] == "RequestValidationError" and "steps" in typed.json()["detail"]
    ranged = c.post("/sdapi/v1/txt2img", auth=ALICE, json={**txt, "width": 65})
    assert ranged.status_code == 422 and ranged.json()["field"] == "width" and "multiple of 8" in ranged.json()["detail"]
    script = c.post("/sdapi/v1/txt2img", auth=ALICE, json={**txt, "alwayson_scripts": {"ADetailer": {"args": []}}})
    assert script.status_code == 422 and script.json()["detail"] == "always on script ADetailer not found"
    unit = c.post("/sdapi/v1/txt2img", auth=ALICE,
                  json={**txt, "alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "module": "canny"}]}}})
    assert unit.status_code == 422 and unit.json()["field"] == "alwayson_scripts.controlnet.args[0].model"
    assert set(unit.json()) >= A1111_ERROR_KEYS and "names no model" in unit.json()["detail"]
    bad = c.post("/sdapi/v1/txt2img", auth=ALICE,
                 json={**txt, "alwayson_scripts": {"controlNET": {"args": [{"module": "canny", "weight": 9}]}}})
    assert bad.status_code == 422 and bad.json()["field"] == "alwayson_scripts.controlnet.args[0].weight"
    missing = c.post("/sdapi/v1/img2img", auth=ALICE, json=txt)
    assert missing.status_code == 404 and missing.json()["detail"] == "Init image not found"
    for response in (sampler, model, typed, script, missing):
        assert "x-process-time" in response.headers
        assert float(response.headers["x-process-time"]) >= 0


def test_nulls_and_unknown_keys_are_ignored_and_unsupported_fields_warned(fake_studio):
    import json

    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": None, "batch_size": None, "cfg_scale": None,
            "sampler_name": None, "restore_faces": True, "tiling": True, "styles": ["cinematic"],
            "alwayson_scripts": {"ControlNet": {"args": []}}, "some_client_key": {"x": 1},
            "override_settings": {"sd_vae": "Automatic", "forge_additional_modules": []}}
    response = fake_studio.client.post("/sdapi/v1/txt2img", auth=BOB, json=body)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    warnings = " ".join(info["warnings"])
    for name in ("restore_faces", "tiling", "cinematic", "forge_additional_modules"):
        assert name in warnings
    assert response.json()["parameters"]["batch_size"] == 1 and response.json()["parameters"]["cfg_scale"] == 7.0
    assert "some_client_key" not in response.json()["parameters"]


def test_infotext_fills_only_what_the_request_left_unset(fake_studio):
    text = ("a harbour at dawn\nNegative prompt: fog\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 123, "
            "Size: 64x64, Model: x, Clip skip: 2, Version: v1.10.1")
    answer = fake_studio.client.post("/sdapi/v1/txt2img", auth=ALICE, json={"infotext": text, "seed": 7})
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert info["prompt"] == "a harbour at dawn" and info["negative_prompt"] == "fog"
    assert info["all_seeds"] == [7] and (info["width"], info["height"]) == (64, 64)  # the request's seed wins


def test_infotext_with_a_refiner_names_it_by_hash():
    from webapp.api.sdapi.generation import build_job_request
    from webapp.api.sdapi.schemas import Txt2ImgBody
    from webapp.services.options import GenerationDefaults

    defaults = GenerationDefaults(checkpoint=None, vae="Automatic", clip_skip=1, samples_format="png",
                                  jpeg_quality=80, enable_pnginfo=True, live_previews=True)
    text = "a castle\nSteps: 20, Sampler: Euler a, Seed: 5, Size: 1024x1024, Refiner: xl-refiner [0123456789], " \
           "Refiner switch at: 0.8, Version: v1.10.1"
    request, _ = build_job_request(Txt2ImgBody(infotext=text), defaults)
    assert request["refiner_checkpoint"] == "0123456789" and request["refiner_switch_at"] == 0.8
    chosen, _ = build_job_request(Txt2ImgBody(infotext=text, refiner_checkpoint="mine"), defaults)
    assert chosen["refiner_checkpoint"] == "mine"
