"""/docs works air-gapped: the Swagger UI page loads its script, style and icon from this server only."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

from tests.conftest import login

EXPECTED_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


def test_docs_page_and_its_assets_come_from_this_server(client):
    login(client, "admin", "admin-password-for-tests")
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", page.text)
    assert urls, page.text
    for url in urls:
        assert not urlsplit(url).netloc, f"{url} is on another host"
    assets = [u for u in urls if u.endswith(tuple(EXPECTED_TYPES))]
    assert {u.rsplit(".", 1)[-1] for u in assets} == {"js", "css", "png"}
    for url in assets:
        answer = client.get(urljoin("http://testserver/docs", url))
        assert answer.status_code == 200, url
        assert EXPECTED_TYPES["." + url.rsplit(".", 1)[-1]] in answer.headers["content-type"], url
    bundle = client.get(next(u for u in assets if u.endswith(".js"))).text
    assert "SwaggerUIBundle" in bundle
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    assert "isOAS31" in bundle, "Swagger UI 5 is needed: version 4 cannot render an OpenAPI 3.1 document"


def test_docs_assets_are_behind_the_gate(client):
    for path in ("/docs", "/openapi.json", "/docs/assets/swagger-ui-bundle.js"):
        assert client.get(path).status_code == 401, path
