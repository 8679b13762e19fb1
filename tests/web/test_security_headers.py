"""Every response carries the anti-framing, no-sniff and referrer headers: pages, API answers, Gradio, refusals."""

from __future__ import annotations

import pytest

from webapp.web.headers import SECURITY_HEADERS

EXPECTED = {
    "content-security-policy": "frame-ancestors 'self'",
    "x-frame-options": "SAMEORIGIN",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


def _assert_headers(response) -> None:
    for name, value in EXPECTED.items():
        assert response.headers.get(name) == value, (response.request.url, name, dict(response.headers))


def test_the_policy_is_the_documented_one():
    assert {name.decode(): value.decode() for name, value in SECURITY_HEADERS} == EXPECTED


@pytest.mark.parametrize("path", ["/sdapi/v1/samplers", "/api/v1/me", "/ui/", "/ui/config"])
def test_headers_on_every_kind_of_answer(admin_client, path):
    response = admin_client.get(path)
    assert response.status_code == 200, (path, response.status_code)
    _assert_headers(response)


def test_headers_on_the_login_page(client):
    response = client.get("/login")
    assert response.status_code == 200
    _assert_headers(response)


def test_headers_on_refusals(client):
    _assert_headers(client.get("/api/v1/me"))  # 401 from the gate
    _assert_headers(client.get("/ui/", headers={"accept": "text/html"}))  # redirect to /login
