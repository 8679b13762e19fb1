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
