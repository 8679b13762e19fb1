"""The PyPI client ``webuiapi`` 0.9.17, unchanged, against a running studio with the tiny SD1.5 model."""

from __future__ import annotations

import base64

import pytest
from PIL import Image

from tests.api.conftest import ALICE
from tests.fixtures.studio_models import CHECKPOINT, EMBEDDING, HYPERNETWORK, LORA, VAE
from tests.live import serve

webuiapi = pytest.importorskip("webuiapi")

SMALL = {"width": 64, "height": 64, "steps": 3, "cfg_scale": 5.0}


@pytest.fixture(scope="module")
def api(real_studio):
    with serve(real_studio.studio.app) as base:
        yield webuiapi.WebUIApi(baseurl=f"{base}/sdapi/v1", username=ALICE[0], password=ALICE[1], steps=3)


def _pixels(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


def test_listing_calls(api, real_studio):
    assert api.util_get_model_names() == [real_studio.models.checkpoint.title]
    assert [m["model_name"] for m in api.get_sd_models()] == [CHECKPOINT]
    assert [lora["name"] for lora in api.get_loras()] == [LORA]
    assert [v["model_name"] for v in api.get_sd_vae()] == [VAE]
    assert [h["name"] for h in api.get_hypernetworks()] == [HYPERNETWORK]
    embeddings = api.get_embeddings()
    assert EMBEDDING in {**embeddings["loaded"], **embeddings["skipped"]}
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert {"name": "Latent"} in api.get_latent_upscale_modes()
    assert api.get_scripts() == {"txt2img": [], "img2img": []} and api.has_controlnet is False
    assert api.get_face_restorers() == [] and api.get_realesrgan_models() == [] and api.get_prompt_styles() == []
    assert api.get_memory()["ram"]["total"] > 0
    assert api.get_cmd_flags()["api"] is True
    assert api.refresh_checkpoints() is None
    assert api.get_options()["sd_model_checkpoint"] == real_studio.models.checkpoint.title


def test_set_and_get_current_model(api, real_studio):
    title = real_studio.models.checkpoint.title
    api.util_set_model(CHECKPOINT.upper())  # lower-cased, then the closest title
    assert api.util_get_current_model() == title
    api.set_options({"sd_model_checkpoint": real_studio.models.checkpoint.sha256})
    assert api.get_options()["sd_checkpoint_hash"] == real_studio.models.checkpoint.sha256
    api.util_wait_for_ready(check_interval=0.05)  # returns at once: alice is idle


def test_txt2img_with_a_lora_in_the_prompt(api):
    plain = api.txt2img(prompt="a cat", seed=123, **SMALL)
    with_lora = api.txt2img(prompt=f"a cat <lora:{LORA}:1>", seed=123, **SMALL)
    again = api.txt2img(prompt=f"a cat <lora:{LORA}:1>", seed=123, **SMALL)
    assert plain.image.size == (64, 64)
    assert _pixels(with_lora.image) == _pixels(again.image), "same seed, same LoRA: same image"
    assert _pixels(with_lora.image) != _pixels(plain.image), "the LoRA must change the image"
    info = with_lora.info
    assert info["seed"] == 123 and info["all_seeds"] == [123] and info["width"] == 64 and info["height"] == 64
    assert info["sd_model_name"] == CHECKPOINT and len(info["sd_model_hash"]) == 10
    assert "Lora hashes" in info["infotexts"][0] and f"<lora:{LORA}:1>" in info["infotexts"][0]
    assert with_lora.image.info["parameters"] == info["infotexts"][0]
    assert with_lora.parameters["prompt"] == f"a cat <lora:{LORA}:1>"


def test_combined_sampler_names_and_hires_fix(api):
    result = api.txt2img(prompt="a hill", seed=3, sampler_name="DPM++ 2M Karras", enable_hr=True, hr_scale=2,
                         hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=2, **SMALL)
    assert result.image.size == (128, 128)
    text = result.info["infotexts"][0]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text and "Hires upscale: 2" in text


def test_batch_and_seeds(api):
    result = api.txt2img(prompt="a dog", seed=40, batch_size=2, n_iter=2, **SMALL)
    assert len(result.images) == 4
    assert result.info["all_seeds"] == [40, 41, 42, 43] and len(result.info["infotexts"]) == 4


def test_img2img_and_inpaint_with_data_uri_images(api):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    result = api.img2img(images=[init], prompt="a red square", seed=7, denoising_strength=0.5, **SMALL)
    assert len(result.images) == 1 and result.image.size == (64, 64)
    assert result.parameters["init_images"] is None  # include_init_images false
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = api.img2img(images=[init], mask_image=mask, prompt="a hole", seed=7, inpainting_fill=1,
                            inpaint_full_res=False, **SMALL)
    assert inpainted.info["is_using_inpainting_conditioning"] is True
    assert "Mask blur" in inpainted.info["infotexts"][0]
    # Outside the mask the init image comes back exactly; inside, the model repainted it.
    rgb = inpainted.image.convert("RGB")
    assert rgb.getpixel((1, 1)) == (200, 30, 30) and rgb.getpixel((62, 62)) == (200, 30, 30)
    assert rgb.getpixel((32, 32)) != (200, 30, 30)


def test_png_info_round_trip(api):
    generated = api.txt2img(prompt="a tower", seed=99, **SMALL)
    answer = api.png_info(generated.image)
    assert answer.info == generated.info["infotexts"][0]
    assert answer.json["parameters"]["Seed"] == "99" and answer.json["parameters"]["Prompt"] == "a tower"


def test_progress_interrupt_skip_when_idle(api):
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    assert api.interrupt() == {} and api.skip() is None


def test_unavailable_features_fail_clearly(api):
    with pytest.raises(RuntimeError) as interrogate:
        api.interrogate(Image.new("RGB", (8, 8)))
    assert interrogate.value.args[0] == 501
    with pytest.raises(RuntimeError) as bad:
        api.txt2img(prompt="x", sampler_name="Nope", **SMALL)
    assert bad.value.args[0] == 404


def test_returned_images_follow_samples_format(api):
    from pipelines.infotext import read_infotext

    api.set_options({"samples_format": "jpg"})
    try:
        result = api.txt2img(prompt="a lake", seed=5, **SMALL)
        assert result.image.format == "JPEG"
        sent = base64.b64decode(result.json["images"][0])
        assert read_infotext(sent) == result.info["infotexts"][0]  # in EXIF UserComment, as A1111 writes JPEGs
    finally:
        api.set_options({"samples_format": "png"})
    assert api.txt2img(prompt="a lake", seed=5, **SMALL).image.format == "PNG"


def test_controlnet_units_are_validated_and_named(api):
    unit = webuiapi.ControlNetUnit(image=Image.new("RGB", (16, 16)), module="canny", model="no_such_controlnet")
    with pytest.raises(RuntimeError) as unknown:
        api.txt2img(prompt="x", controlnet_units=[unit], **SMALL)
    assert unknown.value.args[0] == 422 and "args[0].model" in str(unknown.value.args)
    bad = webuiapi.ControlNetUnit(image=Image.new("RGB", (16, 16)), module="canny", weight=7)
    with pytest.raises(RuntimeError) as weight:
        api.txt2img(prompt="x", controlnet_units=[bad], **SMALL)
    assert weight.value.args[0] == 422 and "args[0].weight" in str(weight.value.args)


def test_txt2img_with_a_canny_unit_returns_the_image_its_detected_map_and_infotext(api, real_studio, tmp_path):
    from tests.tiny import controlnets
    from tests.tiny.fixtures import tiny_files

    model = controlnets.tiny_controlnet(tiny_files().pipeline("sd15").unet)
    path = controlnets.write_ldm(tmp_path / "tinycanny.safetensors", model)
    record = real_studio.registry.register_file(actor=real_studio.admin, path=path, declared_type="controlnet",
                                                name="tinycanny")
    hint = Image.new("RGB", (64, 64))
    hint.paste((255, 255, 255), (16, 16, 48, 48))
    title = f"tinycanny [{record.sha256[:8]}]"
    unit = webuiapi.ControlNetUnit(image=hint, module="canny", model=title, threshold_a=100, threshold_b=200)
    # webuiapi keeps the units of an earlier call in its mutable default alwayson_scripts: pass a fresh one
    plain = api.txt2img(prompt="a cat", seed=5, alwayson_scripts={}, **SMALL)
    result = api.txt2img(prompt="a cat", seed=5, controlnet_units=[unit], alwayson_scripts={}, **SMALL)
    assert len(result.images) == 2, "the generated image, then the detected map"
    assert _pixels(result.images[0]) != _pixels(plain.image)
    edges = result.images[1].convert("L")
    assert edges.size == (64, 64) and edges.getextrema()[1] > 0, "edges were found"
    assert edges.getpixel((32, 32)) == 0 and edges.getpixel((2, 2)) == 0, "the map is the edges, not the square"
    assert result.info["all_seeds"] == [5] and len(result.info["infotexts"]) == 1
    assert f'ControlNet 0: "Module: canny, Model: {title}, Weight: 1.0, ' in result.info["infotexts"][0]
    assert "Threshold A: 100.0, Threshold B: 200.0" in result.info["infotexts"][0]
