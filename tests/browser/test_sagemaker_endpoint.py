"""A SageMaker endpoint end to end in a real browser, on the local data plane (moto + our container + the
runtime router): an administrator deploys an async endpoint from the Endpoints tab, sees it InService, then
generates on it from txt2img ("Generate on Cloud") and sees the image and, in History, the endpoint it ran on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.browser.session import choose_history_entry, set_number, signed_in_page
from tests.conftest import ADMIN_PASSWORD
from tests.fixtures.moto_server import moto_server  # noqa: F401 - fixture
from tests.fixtures.sagemaker_router import CONTAINER_URL_VARIABLE, ROLE_ARN, sagemaker_data_plane  # noqa: F401
from tests.fixtures.studio_models import register_tiny_models, tiny_model_files  # noqa: F401 - fixture
from tests.live import serve
from webapp.ui.generate_form import LOCAL_LABEL

pytestmark = pytest.mark.browser

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/studio-worker:test"
NAME = "browser-sagemaker"


@pytest.fixture
def cloud_studio(make_settings, sagemaker_data_plane, tiny_model_files) -> Iterator[Any]:  # noqa: F811
    """A studio on the data plane's bucket with SageMaker configured and the tiny models registered."""
    import app

    studio = app.build(make_settings(
        backend="fake", store=f"s3://{sagemaker_data_plane.bucket}/studio", sagemaker_image_uri=IMAGE,
        sagemaker_role_arn=ROLE_ARN, endpoint_health_seconds=0.1, skeleton_dirs=[tiny_model_files.skeleton_root]))
    try:
        register_tiny_models(studio, tiny_model_files)
        yield studio
        if studio.jobs.endpoints.find(NAME) is not None:  # leave the session's moto without it
            studio.endpoint_admin.delete(actor=studio.users.get_by_name("admin"), name=NAME, force=True)
    finally:
        studio.close()


def _choose(page: Any, dropdown: str, option: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def _wait_in_service(page: Any, name: str, timeout: float = 60.0) -> str:
    """Press Refresh until the endpoint's row reads InService (bounded); its text. The list only changes on
    Refresh, and the state is read from SageMaker in the background, so one press may still show Creating."""
    row = page.locator('#endpoints-table div[role="row"]', has_text=name)
    deadline = time.monotonic() + timeout
    while True:
        page.click("#endpoints-refresh")
        try:
            page.wait_for_function(
                "(name) => [...document.querySelectorAll('#endpoints-table div[role=row]')]"
                ".some(r => r.innerText.includes(name) && r.innerText.includes('InService'))", arg=name, timeout=5_000)
            return row.inner_text()
        except PlaywrightTimeout:
            assert time.monotonic() < deadline, f"{name} is not InService after {timeout}s: {row.all_inner_texts()}"


def test_deploy_on_sagemaker_then_generate_on_cloud(browser, cloud_studio, sagemaker_data_plane):  # noqa: F811
    container = sagemaker_data_plane.container.url
    with serve(cloud_studio.app) as base:
        context, page = signed_in_page(browser, base, "admin", ADMIN_PASSWORD)
        try:
            page.get_by_role("tab", name="Endpoints").click()
            page.locator("#endpoint-kind input").wait_for(timeout=30_000)
            _choose(page, "#endpoint-kind", "sagemaker")
            page.locator("#endpoint-sagemaker-environment").wait_for(state="visible", timeout=30_000)
            page.locator("#endpoint-name").get_by_role("textbox").fill(NAME)
            _choose(page, "#endpoint-sagemaker-endpoint-type", "async")
            page.locator("#endpoint-sagemaker-environment").get_by_role("textbox").fill(
                json.dumps({CONTAINER_URL_VARIABLE: container}))
            set_number(page, "#endpoint-sagemaker-state-seconds", 0.1)
            set_number(page, "#endpoint-sagemaker-poll-seconds", 0.1)
            set_number(page, "#endpoint-min", 0)
            set_number(page, "#endpoint-max", 2)
            page.locator("#endpoint-autoscale input").check()
            page.click("#endpoint-deploy")
            page.locator('#endpoints-table div[role="row"]', has_text=NAME).wait_for(timeout=30_000)

            row = _wait_in_service(page, NAME)
            assert "sagemaker" in row and "0–2 autoscale" in row, row
            endpoint = cloud_studio.jobs.endpoints.find(NAME)
            assert endpoint.remote and endpoint.config["endpoint_type"] == "async"
            assert endpoint.config["environment"] == {CONTAINER_URL_VARIABLE: container}

            page.get_by_role("tab", name="txt2img").click()
            page.wait_for_function(
                "() => document.querySelector('#txt2img-checkpoint input')?.value.includes('tiny-sd15')",
                timeout=30_000)
            generate = page.locator("#txt2img-generate")
            assert generate.inner_text().strip() == LOCAL_LABEL  # the default endpoint (local) comes first
            page.locator("#txt2img-endpoint input").click()
            page.get_by_role("option").filter(has_text=f"{NAME} (cloud, InService)").click()
            page.wait_for_function("() => document.querySelector('#txt2img-generate')?.innerText.trim() "
                                   "=== 'Generate on Cloud'", timeout=30_000)
            page.locator("#txt2img-prompt textarea").fill("a harbour at dusk")
            set_number(page, "#txt2img-steps", 4)
            set_number(page, "#txt2img-width", 64)
            set_number(page, "#txt2img-height", 64)
            page.locator("#txt2img-seed input").fill("77")
            generate.click()

            result = page.locator("#txt2img-results img.studio-result").first
            result.wait_for(timeout=60_000)
            page.wait_for_function("(img) => img.complete && img.naturalWidth === 64", arg=result.element_handle(),
                                   timeout=30_000)
            job_id = result.get_attribute("src").split("/")[3]
            job = cloud_studio.jobs.get(actor=cloud_studio.users.get_by_name("admin"), job_id=job_id)
            assert job.endpoint == NAME and job.worker == NAME and job.remote_handle is not None

            choose_history_entry(page, "txt2img", f"-txt2img-succeeded-{job_id}")
            details = page.locator("#txt2img-history-details")
            details.get_by_text(NAME, exact=True).wait_for(timeout=30_000)
            assert "Endpoint" in details.inner_text()
        finally:
            context.close()
