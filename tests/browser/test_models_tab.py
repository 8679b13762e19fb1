"""Models tab in a real browser: upload a tiny LoRA through the chunked uploader, see its progress line
and its row appear Active in the table."""

from __future__ import annotations

import pytest

from tests.browser.session import signed_in_page
from tests.conftest import ADMIN_PASSWORD
from tests.live import serve

pytestmark = pytest.mark.browser


@pytest.fixture
def lora_file(tmp_path):
    import torch

    from tests.tiny.fixtures import tiny_files
    from tests.tiny.networks import write_kohya_lora

    torch.set_num_threads(2)
    return write_kohya_lora(tmp_path / "inkstyle.safetensors", tiny_files().pipeline("sd15"))


def test_upload_a_lora_through_the_models_tab(browser, studio, lora_file):
    with serve(studio.app) as base:
        context, page = signed_in_page(browser, base, "admin", ADMIN_PASSWORD)
        page.get_by_role("tab", name="Models").click()
        page.get_by_role("tab", name="From computer").click()
        page.select_option(".studio-upload-type", "lora")
        page.set_input_files(".studio-upload-input", str(lora_file))
        page.click(".studio-upload-button")
        line = page.locator(".studio-upload-line", has_text="inkstyle.safetensors")
        line.wait_for(timeout=30_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.studio-upload-line')].some(d => d.dataset.state === 'done')",
            timeout=60_000,
        )
        assert 'Active as "inkstyle"' in line.inner_text()
        row = page.locator('#models-table div[role="row"]', has_text="inkstyle")  # not the hidden sizing rows
        row.wait_for(timeout=30_000)
        assert "Active" in row.inner_text() and "LoRA" in row.inner_text()
        context.close()
    admin = studio.users.get_by_name("admin")
    record = studio.models.find(actor=admin, type="lora", ref="inkstyle")
    assert record is not None and record.size == lora_file.stat().st_size


def test_an_upload_shared_with_a_role_is_stored_with_that_role(browser, studio, lora_file):
    admin = studio.users.get_by_name("admin")
    inkers = studio.roles.create_role(actor=admin, name="Inkers", permissions=["model:list", "model:use"])
    with serve(studio.app) as base:
        context, page = signed_in_page(browser, base, "admin", ADMIN_PASSWORD)
        page.get_by_role("tab", name="Models").click()
        page.get_by_role("tab", name="From computer").click()
        page.locator("#models-upload-visibility input").click()
        page.get_by_role("option", name="roles", exact=True).click()
        page.locator("#models-upload-roles input").click()
        page.get_by_role("option", name="Inkers", exact=True).click()
        page.wait_for_function(
            "() => document.querySelector('#models-upload-sharing textarea, #models-upload-sharing input')"
            "?.value.includes('Inkers')", timeout=30_000)
        page.select_option(".studio-upload-type", "lora")
        page.set_input_files(".studio-upload-input", str(lora_file))
        page.click(".studio-upload-button")
        page.wait_for_function(
            "() => [...document.querySelectorAll('.studio-upload-line')].some(d => d.dataset.state === 'done')",
            timeout=60_000,
        )
        context.close()
    record = studio.models.find(actor=admin, type="lora", ref="inkstyle")
    assert record is not None and record.visibility.value == "roles"
    assert str(inkers.id) in record.allowed_roles.split(","), record.allowed_roles


def test_an_upload_cut_off_by_a_reload_resumes_with_the_same_session(browser, studio, lora_file):
    from sqlmodel import select

    from webapp.records import UploadSession

    def open_uploader(page) -> None:
        page.get_by_role("tab", name="Models").click()
        page.get_by_role("tab", name="From computer").click()
        page.select_option(".studio-upload-type", "lora")
        page.set_input_files(".studio-upload-input", str(lora_file))
        page.click(".studio-upload-button")

    def line_state(page, state: str) -> None:
        page.wait_for_function(
            "s => [...document.querySelectorAll('.studio-upload-line')].some(d => d.dataset.state === s)",
            arg=state, timeout=60_000)

    with serve(studio.app) as base:
        context, page = signed_in_page(browser, base, "admin", ADMIN_PASSWORD)
        page.route("**/api/v1/uploads/*/complete", lambda route: route.abort())  # the link drops at the end
        open_uploader(page)
        line_state(page, "failed")
        page.unroute("**/api/v1/uploads/*/complete")
        page.reload()
        open_uploader(page)
        line_state(page, "done")
        assert 'Active as "inkstyle"' in page.locator(".studio-upload-line").inner_text()
        context.close()
    with studio.db.read() as s:
        sessions = s.exec(select(UploadSession)).all()
    assert len(sessions) == 1, "the second try resumed the first upload instead of starting another"
