"""Import models from URLs: direct links, Civitai download links, Hugging Face ``owner/repo/file``.

As in the original "from URL" tab, users paste a comma-separated list plus an optional JSON
description; each URL becomes one progress line of a background task. Every hop — redirects
included — goes through the SSRF guard (ssrf.py), downloads are capped at ``max_upload_gb`` and
streamed to a temp file, then handed to the one import path.

Credentials: configured Civitai / Hugging Face tokens are sent as bearer headers to those hosts only
(never to the CDN a download redirects to). Tokens inside URLs (``?token=...``, ``user:pass@``) are
used for the download and redacted everywhere else: task rows, model rows, log lines — httpx's own
request log included.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import httpx
from pydantic import SecretStr

from webapp.records import ImportTask, ModelType, TaskKind, User, Visibility
from webapp.services.access import authorize
from webapp.services.errors import InvalidInput, ServiceError
from webapp.services.models import catalog
from webapp.services.models.importer import Importer, ImportRequest
from webapp.services.models.ssrf import BlockedUrl, GuardedTransport, SsrfGuard
from webapp.services.models.tasks import ImportTasks, TaskContext

log = logging.getLogger(__name__)

MAX_URLS = 20
MAX_REDIRECTS = 5
CHUNK = 1 << 20
_SECRET_PARAM = re.compile(r"token|key|sig|secret|auth|credential|password|session|x-amz-", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"https?://[^\s\"'<>]+")
_FILENAME_STAR = re.compile(r"filename\*\s*=\s*(?:UTF-8|utf-8)?''([^;]+)")
_FILENAME = re.compile(r'filename\s*=\s*"?([^";]+)"?')
_HF_BARE = re.compile(r"^(?:hf://)?(?P<owner>[A-Za-z0-9_-][A-Za-z0-9_.-]*)/(?P<repo>[A-Za-z0-9_.-]+)/(?P<path>.+)$")


def redact_url(url: str) -> str:
    """The URL with user:password and secret-looking query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username or parts.password:
        netloc = f"***@{netloc}"
    query = urlencode([(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in parse_qsl(parts.query, True)],
                      safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_text(text: str) -> str:
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


class _RedactUrls(logging.Filter):
    """httpx logs every request URL at INFO; those URLs may carry tokens."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.args = tuple(redact_text(str(a)) if isinstance(a, httpx.URL | str) else a for a in args)
        return True


def install_log_redaction() -> None:
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactUrls) for f in logger.filters):
        logger.addFilter(_RedactUrls())


def parse_url_list(urls: str | list[str]) -> list[str]:
    """Comma- (or newline-) separated text or a list; blanks dropped."""
    raw = urls if isinstance(urls, list) else re.split(r"[,\n]", urls or "")
    out = [u.strip() for u in raw if isinstance(u, str) and u.strip()]
    if not out:
        raise InvalidInput("`urls` must name at least one URL", field="urls")
    if len(out) > MAX_URLS:
        raise InvalidInput(f"`urls` names {len(out)} URLs; at most {MAX_URLS} per import", field="urls")
    return out


def normalise(url: str) -> str:
    """Turn the links people paste into direct download links."""
    if "://" not in url and (m := _HF_BARE.match(url)) and "." not in m.group("owner"):
        return f"https://huggingface.co/{m.group('owner')}/{m.group('repo')}/resolve/main/{m.group('path')}"
    if url.startswith("hf://") and (m := _HF_BARE.match(url)):
        return f"https://huggingface.co/{m.group('owner')}/{m.group('repo')}/resolve/main/{m.group('path')}"
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host in ("huggingface.co", "www.huggingface.co") and "/blob/" in parts.path:
        return urlunsplit((parts.scheme, parts.netloc, parts.path.replace("/blob/", "/resolve/", 1), parts.query, ""))
    if host in ("civitai.com", "www.civitai.com") and (m := re.match(r"^/models/(\d+)", parts.path)):
        version = dict(parse_qsl(parts.query)).get("modelVersionId")
        if not version:
            raise InvalidInput(
                f"{redact_url(url)} is a Civitai model page without a version; paste its download link "
                "(…/api/download/models/<version id>) or a page link with ?modelVersionId=", field="urls")
        return f"https://civitai.com/api/download/models/{version}"
    return url


def _file_name(response: httpx.Response, url: httpx.URL) -> str:
    disposition = response.headers.get("content-disposition", "")
    match = _FILENAME_STAR.search(disposition) or _FILENAME.search(disposition)
    name = unquote(match.group(1)).strip() if match else unquote(url.path.rsplit("/", 1)[-1])
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip().lstrip(".")
    name = "".join(c for c in name if c.isprintable())[:200]
    if not name:
        name = "download"
    if not name.lower().endswith(catalog.MODEL_EXTENSIONS):
        name += ".bin"  # content decides the format; .bin claims nothing
    return name


class UrlImports:
    def __init__(
        self, importer: Importer, tasks: ImportTasks, *, allow: list[str], max_bytes: int,
        civitai_token: SecretStr | None = None, hf_token: SecretStr | None = None,
    ) -> None:
        self._importer = importer
        self._tasks = tasks
        self.guard = SsrfGuard(allow)
        self._max_bytes = max_bytes
        self._civitai = civitai_token
        self._hf = hf_token
        install_log_redaction()
        tasks.register(TaskKind.URL, self._run)

    def start(
        self, *, actor: User, urls: str | list[str], declared_type: ModelType | str, description: str | None = None,
        visibility: Visibility | str = Visibility.EVERYONE,
    ) -> ImportTask:
        """Validate the list now (bad scheme, literal private address → 422), download in the background."""
        authorize(actor, "model:create")
        if not declared_type:
            raise InvalidInput("choose the model `type` of the files behind these URLs", field="type")
        model_type = catalog.parse_type(declared_type)
        text, metadata = catalog.parse_description(description)
        vis = catalog.parse_visibility(visibility)
        targets: list[str] = []
        items: list[dict[str, Any]] = []
        for raw in parse_url_list(urls):
            url = normalise(raw)
            try:
                parsed = httpx.URL(url)
                self.guard.check_url(parsed)
            except BlockedUrl as exc:
                raise InvalidInput(f"{redact_url(raw)}: {exc}", field="urls") from None
            except (httpx.InvalidURL, ValueError) as exc:
                raise InvalidInput(f"{redact_url(raw)} is not a valid URL ({exc})", field="urls") from None
            targets.append(url)
            items.append({"source": redact_url(url), "type": model_type.value})
        has_secrets = any(redact_url(u) != u for u in targets)
        params = {"urls": [i["source"] for i in items], "type": model_type.value, "description": text,
                  "metadata": metadata, "visibility": vis.value, "resumable": not has_secrets}
        payload = targets if has_secrets else None
        return self._tasks.submit(kind=TaskKind.URL, owner=actor, params=params, items=items, payload=payload)

    # -- the task ------------------------------------------------------------------------------------

    def _run(self, ctx: TaskContext) -> None:
        urls = ctx.payload or ctx.params["urls"]
        model_type = ModelType(ctx.params["type"])
        transport = GuardedTransport(self.guard)
        with httpx.Client(transport=transport, follow_redirects=False, trust_env=False,
                          timeout=httpx.Timeout(30.0, read=300.0)) as client:
            for index, url in enumerate(urls):
                ctx.check_stop()
                shown = ctx.items[index]["source"]
                reserved: list[str] = []

                def reserve(file_name: str, index: int = index, shown: str = shown, reserved: list = reserved) -> None:
                    """Once the response names the file: an `Initial` row shows it arriving."""
                    record = self._importer.reserve(
                        owner=ctx.owner, model_type=model_type, file_name=file_name, name=None, source="url",
                        source_detail=shown, visibility=Visibility(ctx.params["visibility"]),
                        description=ctx.params.get("description"),
                    )
                    reserved.append(record.id)
                    ctx.update(index, reserved_id=record.id, file_name=file_name, model_name=record.name)

                try:
                    ctx.update(index, state="connecting")
                    path, file_name = self._download(client, url, ctx, index, reserve)
                    outcome = self._importer.import_file(path, ImportRequest(
                        owner=ctx.owner, declared_type=model_type, file_name=file_name, source="url",
                        source_detail=shown, visibility=Visibility(ctx.params["visibility"]),
                        description=ctx.params.get("description"), metadata=ctx.params.get("metadata"),
                        reserved_id=reserved[0],
                    ), progress=ctx.progress_callback(index))
                    path.unlink(missing_ok=True)
                    ctx.update(index, state="done" if outcome.created else "known", model_id=outcome.record.id,
                               model_name=outcome.record.name, reserved_id=None,
                               message="imported" if outcome.created else "already registered (same bytes)")
                except ServiceError as exc:
                    self._importer.discard_reserved(reserved[0] if reserved else None)
                    ctx.update(index, state="failed", message=redact_text(exc.message), reserved_id=None)
                except httpx.HTTPError as exc:
                    self._importer.discard_reserved(reserved[0] if reserved else None)
                    reason = redact_text(str(exc)) or type(exc).__name__
                    ctx.update(index, state="failed", message=f"download failed: {reason}", reserved_id=None)

    def _headers(self, url: httpx.URL) -> dict[str, str]:
        host = url.host.lower()
        if self._civitai is not None and (host == "civitai.com" or host.endswith(".civitai.com")):
            return {"Authorization": f"Bearer {self._civitai.get_secret_value()}"}
        if self._hf is not None and host == "huggingface.co":
            return {"Authorization": f"Bearer {self._hf.get_secret_value()}"}
        return {}

    def _download(self, client: httpx.Client, url: str, ctx: TaskContext, index: int,
                  on_file_name: Callable[[str], None]) -> tuple[Path, str]:
        current = httpx.URL(url)
        shown = ctx.items[index]["source"]
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                self.guard.check_url(current)
                with client.stream("GET", current, headers={"User-Agent": "studio-model-import",
                                                            **self._headers(current)}) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise InvalidInput(f"{shown} redirected without a Location", field="urls")
                        current = current.join(location)
                        continue
                    if response.status_code >= 400:
                        hint = " (it may need an access token)" if response.status_code in (401, 403) else ""
                        raise InvalidInput(f"{redact_url(str(current))} answered HTTP {response.status_code}{hint}",
                                           field="urls")
                    return self._save(response, current, ctx, index, on_file_name)
            except BlockedUrl as exc:
                where = "" if str(current) == url else f" (redirected to {redact_url(str(current))})"
                raise InvalidInput(f"{shown}{where}: {exc}", field="urls") from None
        raise InvalidInput(f"{shown} redirected more than {MAX_REDIRECTS} times", field="urls")

    def _save(self, response: httpx.Response, url: httpx.URL, ctx: TaskContext, index: int,
              on_file_name: Callable[[str], None]) -> tuple[Path, str]:
        file_name = _file_name(response, url)
        declared = response.headers.get("content-length")
        total = int(declared) if declared and declared.isdigit() else 0
        if total > self._max_bytes:
            raise InvalidInput(f"{file_name} is {total} bytes; the limit is {self._max_bytes}", field="urls")
        on_file_name(file_name)
        target = ctx.temp_dir / str(index) / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        done = 0
        with target.open("wb") as out:
            for chunk in response.iter_bytes(CHUNK):
                done += len(chunk)
                if done > self._max_bytes:
                    raise InvalidInput(f"{file_name} is larger than the {self._max_bytes}-byte limit", field="urls")
                out.write(chunk)
                ctx.check_stop()
                ctx.update(index, state="downloading", done=done, total=total or done)
        if total and done != total:
            raise InvalidInput(f"{file_name}: the download ended after {done} of {total} bytes", field="urls")
        return target, file_name
