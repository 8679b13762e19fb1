"""Models tab in a real browser: upload a tiny LoRA through the chunked uploader, see its progress line
and its row appear Active in the table."""

from __future__ import annotations

import pytest

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
        context = browser.new_context()
        page = context.new_page()
        page.goto(base + "/login")
        page.fill("#username", "admin")
        page.fill("#password", ADMIN_PASSWORD)
        page.click("#login-button")
        page.wait_for_url("**/ui/**")
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
