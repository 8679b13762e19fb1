"""``/docs`` served air-gapped: Swagger UI's script, style and icon come from an installed package.

FastAPI's default page loads them from a CDN, which a server without internet cannot reach (a blank page).
This is FastAPI's "self-hosting JavaScript and CSS for docs" recipe with the files that the
``fastapi-offline`` package ships (Swagger UI 5: FastAPI writes OpenAPI 3.1, which Swagger UI 4 — the one in
``swagger-ui-bundle`` — cannot render). The page and its assets sit behind the gate like the API itself.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """Add ``/docs`` (and Swagger's OAuth2 redirect page) to an app built with ``docs_url=None``."""
    assets = files("fastapi_offline") / "static"
    app.mount(ASSETS_URL, StaticFiles(directory=str(assets)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} - API docs", oauth2_redirect_url=redirect_url,
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png", swagger_ui_parameters=app.swagger_ui_parameters,
        )

    if redirect_url:
        @app.get(redirect_url, include_in_schema=False)
        def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()
