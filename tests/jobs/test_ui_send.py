""""Send to img2img" carries the result's generation parameters, as A1111 does, not only the image."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.jobs.test_ui import Tabs, generate, req


@pytest.fixture(scope="module")
def tabs(shared_fake_studio) -> Tabs:
    return Tabs(shared_fake_studio)


def test_send_to_img2img_carries_the_selected_results_parameters(fake_studio, tabs):
    title = fake_studio.models.checkpoint.title
    job_id, _ = generate(tabs.txt2img, fake_studio.admin, prompt="a red lighthouse", negative_prompt="fog",
                         checkpoint=title, steps=5, width=64, height=72, seed=4321, sampler_name="Euler a",
                         cfg_scale=9.5, batch_size=2, endpoint="local")
    img2img = tabs.img2img
    c = img2img.form.c

    updates = img2img.receive(job_id, 1, req(fake_studio.admin))  # the second image of the batch

    assert isinstance(updates[c["image"]], Image.Image) and updates[c["image"]].size == (64, 72)
    assert updates[c["prompt"]] == "a red lighthouse" and updates[c["negative_prompt"]] == "fog"
    assert (updates[c["width"]], updates[c["height"]]) == (64, 72)
    assert updates[c["seed"]] == 4322, "the seed of the chosen image (batch seeds count up), as A1111 sends"
    assert updates[c["steps"]] == 5 and updates[c["sampler_name"]] == "Euler a" and updates[c["cfg_scale"]] == 9.5
    assert updates[c["checkpoint"]] == title
    assert c["denoising_strength"] not in updates, "a txt2img job has no img2img denoising strength to carry"

