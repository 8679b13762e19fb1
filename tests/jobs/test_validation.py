"""Request validation shared by the UI, /sdapi/v1 and /api/v1: size limits, undecodable images and text,
``override_settings``. Pure functions (no studio), so each case is cheap."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from pipelines.types import InvalidRequestError, RequestLimits
from tests.fixtures.images import bomb_png, png_b64
from webapp.records import JobMode
from webapp.services.errors import InvalidInput
from webapp.services.jobs.requests import engine_request

LIMITS = RequestLimits(max_prompt_chars=100, max_job_pixels=256 * 256 * 4, max_job_images=8)


def request(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"prompt": "a fox", "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler"}
    values.update(overrides)
    return values


def refused(mode: JobMode, values: dict[str, Any], limits: RequestLimits | None = LIMITS) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        engine_request(mode, values, limits)
    assert caught.value.status == 422
    return caught.value


# -- S3: size limits ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"])
def test_prompts_longer_than_the_limit_are_refused_naming_the_field(field):
    engine_request(JobMode.TXT2IMG, request(**{field: "x" * 100}), LIMITS)  # at the limit: fine
    error = refused(JobMode.TXT2IMG, request(**{field: "x" * 101, "enable_hr": True}))
    assert error.field == field and "100" in error.message


def test_pixels_per_job_count_width_height_and_batch():
    engine_request(JobMode.TXT2IMG, request(width=256, height=256, batch_size=4), LIMITS)
    error = refused(JobMode.TXT2IMG, request(width=256, height=256, batch_size=5))
    assert error.field == "batch_size" and "262144" in error.message.replace(",", "")
    assert refused(JobMode.TXT2IMG, request(width=1024, height=512)).field == "width"


def test_the_hires_fix_target_counts_against_the_pixel_limit():
    engine_request(JobMode.TXT2IMG, request(width=128, height=128, batch_size=4, enable_hr=True, hr_scale=2), LIMITS)
    error = refused(JobMode.TXT2IMG, request(width=128, height=128, batch_size=4, enable_hr=True, hr_scale=2.5))
    assert error.field == "hr_scale"
    error = refused(JobMode.TXT2IMG, request(width=128, height=128, batch_size=2, enable_hr=True, hr_resize_x=512,
                                             hr_resize_y=512))
    assert error.field == "hr_resize_x"


def test_images_per_job_count_n_iter_times_batch():
    engine_request(JobMode.TXT2IMG, request(n_iter=4, batch_size=2), LIMITS)
    error = refused(JobMode.TXT2IMG, request(n_iter=3, batch_size=3))
    assert error.field == "n_iter" and "8" in error.message


def test_default_limits_let_real_sdxl_jobs_through_and_stop_the_abusive_ones():
    defaults = RequestLimits()
    engine_request(JobMode.TXT2IMG, request(width=1024, height=1024, batch_size=8, enable_hr=True, hr_scale=2,
                                            prompt="p" * 5000), defaults)
    engine_request(JobMode.TXT2IMG, request(width=2048, height=2048, batch_size=8, n_iter=12), defaults)
    assert refused(JobMode.TXT2IMG, request(width=8192, height=8192, batch_size=64), defaults).field == "batch_size"
    assert refused(JobMode.TXT2IMG, request(n_iter=100, batch_size=64), defaults).field == "n_iter"
    assert refused(JobMode.TXT2IMG, request(prompt="x" * 1_000_000), defaults).field == "prompt"


def test_a_long_infotext_line_parses_in_linear_time():
    import time

    from pipelines import infotext

    start = time.perf_counter()
    parsed = infotext.parse("a" * 200_000)  # no colon: the unbounded key pattern backtracked for minutes
    assert time.perf_counter() - start < 3.0 and parsed["Prompt"] == "a" * 200_000
    long_key = "K" * 100 + ": 1, Steps: 20, Sampler: Euler, Seed: 5"
    assert infotext.parse(f"fox\n{long_key}")["Steps"] == "20"


# -- S7: decompression bombs and garbage images ------------------------------------------------------------
def test_a_decompression_bomb_is_refused_naming_the_field_without_decoding_it():
    bomb = base64.b64encode(bomb_png(30000, 30000)).decode("ascii")
    assert len(bomb) < 400_000
    error = refused(JobMode.IMG2IMG, request(init_images=[bomb]), None)  # PIL's own limit, even with no job limit
    assert error.field == "init_images[0]" and "900000000 pixels" in error.message
    error = refused(JobMode.INPAINT, request(init_images=[png_b64(64, 64)], mask=bomb))
    assert error.field == "mask"


def test_an_input_image_over_the_jobs_pixel_limit_is_refused_before_decoding():
    big = base64.b64encode(bomb_png(4000, 4000)).decode("ascii")  # under PIL's limit, over the job's
    error = refused(JobMode.IMG2IMG, request(init_images=[png_b64(64, 64), big], batch_size=2))
    assert error.field == "init_images[1]" and "4000x4000" in error.message


def test_garbage_is_refused_naming_the_field():
    garbage = base64.b64encode(b"not an image at all").decode()
    assert refused(JobMode.IMG2IMG, request(init_images=[garbage])).field == "init_images[0]"


@pytest.mark.parametrize("data", [b"not an image at all", base64.b64decode(png_b64(64, 64))[:60]])
def test_the_engine_decoder_refuses_garbage_and_truncated_images(data):
    from pipelines.images import decode_image

    with pytest.raises(InvalidRequestError) as caught:
        decode_image(data, "init_images[0]")
    assert caught.value.field == "init_images[0]"


def test_the_engine_decoder_refuses_a_bomb_too():
    from pipelines.images import decode_image

    with pytest.raises(InvalidRequestError) as caught:
        decode_image(bomb_png(30000, 30000), "mask", mode="L")
    assert caught.value.field == "mask"


# -- S8: text that cannot be stored ---------------------------------------------------------------------------
@pytest.mark.parametrize(("values", "field"), [
    ({"prompt": "a \ud800 fox"}, "prompt"),
    ({"negative_prompt": "\udfff"}, "negative_prompt"),
    ({"override_settings": {"sd_model_checkpoint": "m\ud800"}}, "override_settings.sd_model_checkpoint"),
    ({"styles": ["ok", "\ud83d"]}, "styles[1]"),
    ({"comments": {"\ud800": "key"}}, "comments"),
    ({"override_settings": {"sd_model_checkpoint": "m\x00"}}, "override_settings.sd_model_checkpoint"),
    ({"prompt": "a \x00 fox"}, "prompt"),
])
def test_text_that_is_not_valid_unicode_is_refused_naming_the_field(values, field):
    error = refused(JobMode.TXT2IMG, request(**values))
    assert error.field == field


def test_paired_surrogates_from_json_are_ordinary_text():
    import json

    decoded = json.loads('{"prompt": "a fox \\ud83e\\udd8a"}')
    assert engine_request(JobMode.TXT2IMG, request(**decoded), LIMITS).prompt == "a fox \U0001f98a"


# -- S9: override_settings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["x", ["sd_model_checkpoint"], 5])
def test_override_settings_must_be_an_object(value):
    error = refused(JobMode.TXT2IMG, request(override_settings=value))
    assert error.field == "override_settings"
