"""Signing in through our own login page, as every browser test starts."""

from __future__ import annotations

from typing import Any


def sign_in(page: Any, base: str, username: str, password: str) -> None:
    """From ``/`` (redirected to the login page) to the UI with ``username`` shown as signed in."""
    page.goto(base + "/")
    page.wait_for_url("**/login*")
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#login-button")
    page.wait_for_url("**/ui/**")
    page.get_by_text(f"Signed in as {username}").wait_for(timeout=60_000)


def signed_in_page(browser: Any, base: str, username: str, password: str) -> tuple[Any, Any]:
    """A new browser context (its own cookies) and a page signed in as ``username``."""
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, base, username, password)
    return context, page


def set_number(page: Any, selector: str, value: float) -> None:
    """Type ``value`` into the number box of the form field ``selector`` and commit it."""
    field = page.locator(f"{selector} input[type=number]")
    field.fill(str(value))
    field.press("Enter")


def choose_history_entry(page: Any, tab: str, label: str, timeout_s: float = 90.0) -> None:
    """Open ``tab``'s History list and choose the entry whose label holds ``label``.

    The list follows a finished job through a refresh queued behind the job's own events; on a busy machine that
    refresh can come late, so the user's way round it is taken: press Refresh and look again.
    """
    import time

    deadline = time.monotonic() + timeout_s
    jobs = page.locator(f"#{tab}-history-jobs input")
    while True:
        jobs.click()
        entry = page.get_by_role("option").filter(has_text=label)
        try:
            entry.wait_for(timeout=10_000)
        except Exception:
            if time.monotonic() > deadline:
                raise
            jobs.press("Escape")
            page.click(f"#{tab}-history-refresh")
            continue
        entry.click()
        return
