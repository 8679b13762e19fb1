"""Roles in a real browser: a Designer generates but cannot deploy; an IT Operator deploys but does not see the
Designer's images; the Users tab is for those who may list users."""

from __future__ import annotations

import pytest

from tests.browser.session import set_number, signed_in_page
from tests.fixtures.studio_models import model_studio, tiny_model_files  # noqa: F401 - fixtures
from tests.live import serve

pytestmark = pytest.mark.browser

PASSWORD = "a-long-enough-password"


def _endpoint_row(page, name: str):
    return page.locator('#endpoints-table div[role="row"]', has_text=name)


def test_designer_generates_but_cannot_deploy_and_operator_cannot_see_their_images(browser, model_studio):  # noqa: F811
    admin = model_studio.admin
    model_studio.users.create_user(actor=admin, username="dora", password=PASSWORD)  # the default role: Designer
    model_studio.users.create_user(actor=admin, username="olga", password=PASSWORD, roles=["IT Operator"])
    with serve(model_studio.app) as base:
        context, page = signed_in_page(browser, base, "dora", PASSWORD)
        page.wait_for_function(
            "() => document.querySelector('#txt2img-checkpoint input')?.value.includes('tiny-sd15')", timeout=60_000)
        page.locator("#txt2img-prompt textarea").fill("a designer's lighthouse")
        set_number(page, "#txt2img-steps", 2)
        set_number(page, "#txt2img-width", 64)
        set_number(page, "#txt2img-height", 64)
        page.click("#txt2img-generate")
        result = page.locator("#txt2img-results img.studio-result").first
        result.wait_for(timeout=120_000)
        dora_image = result.get_attribute("src")
        assert dora_image.startswith("/files/jobs/")
        assert not page.get_by_role("tab", name="Users").is_visible(), "a Designer may not list users"
        page.get_by_role("tab", name="Endpoints").click()
        _endpoint_row(page, "local").wait_for(timeout=30_000)
        assert not page.locator("#endpoint-deploy").is_visible(), "a Designer has no deploy form"
        context.close()

        context, page = signed_in_page(browser, base, "olga", PASSWORD)
        page.get_by_role("tab", name="Endpoints").click()
        page.locator("#endpoint-deploy").wait_for(state="visible", timeout=30_000)  # an IT Operator deploys
        page.locator("#endpoint-kind input").click()
        page.get_by_role("option", name="http", exact=True).click()
        page.locator("#endpoint-name").get_by_role("textbox").fill("gpu-box")
        page.locator("#endpoint-http-url input, #endpoint-http-url textarea").first.fill("http://127.0.0.1:9")
        page.locator("#endpoint-http-secret input[type=password]").fill("a-shared-secret-for-tests")
        page.click("#endpoint-deploy")
        _endpoint_row(page, "gpu-box").wait_for(timeout=30_000)
        assert model_studio.jobs.endpoints.find("gpu-box") is not None

        page.get_by_role("tab", name="txt2img").click()
        history = page.locator("#txt2img-history-jobs")
        page.click("#txt2img-history-refresh")
        page.locator("#txt2img-history-summary").get_by_text("0 of 0 jobs").wait_for(timeout=30_000)
        assert not page.locator("#txt2img-history-all-users").is_visible(), "no 'all users' for an IT Operator"
        history.locator("input").click()
        assert page.get_by_role("option").filter(has_text="succeeded").count() == 0
        shown = page.request.get(base + dora_image)
        assert shown.status == 404, "the Designer's image is not served to the IT Operator"
        context.close()
