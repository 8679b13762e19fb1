"""The UI's languages: English, 简体中文 and 日本語, chosen per user (Account tab) with the browser's as default."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

LANGUAGES: dict[str, str] = {"en": "English", "zh-CN": "简体中文", "ja": "日本語"}
DEFAULT_LANGUAGE = "en"


def negotiate(accept_language: str | None) -> str:
    """The best of ``LANGUAGES`` for an ``Accept-Language`` header (``ja-JP,ja;q=0.9`` → ``ja``; any Chinese →
    ``zh-CN``); English when none fits."""
    ranked: list[tuple[float, int, str]] = []
    for index, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        if tag:
            ranked.append((-quality, index, tag.strip().lower()))
    for _, _, tag in sorted(ranked):
        if tag.startswith("zh"):
            return "zh-CN"
        if tag.startswith("ja"):
            return "ja"
        if tag.startswith("en") or tag == "*":
            return "en"
    return DEFAULT_LANGUAGE


def language_for(preferred: str | None, accept_language: str | None) -> str:
    """The user's choice when they made one, else what the browser asks for."""
    return preferred if preferred in LANGUAGES else negotiate(accept_language)


# -- the language of the current request (set by the UI's handler wrapper and the API's error edge) -------------

_current: ContextVar[str] = ContextVar("studio_language", default=DEFAULT_LANGUAGE)


def current_language() -> str:
    return _current.get()


@contextmanager
def use_language(language: str | None) -> Iterator[str]:
    """Run a block in ``language`` (unknown or None: English)."""
    chosen = language if language in LANGUAGES else DEFAULT_LANGUAGE
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)


def translate(text: str, language: str | None = None) -> str:
    """``text`` in ``language`` (default: the current one): the catalogs' exact entry for a UI string, else the
    first message template matching it (``webapp/i18n/catalog.py``), else ``text`` unchanged."""
    from webapp.i18n.catalog import lookup
    return lookup(text, language or current_language())
