"""Text a client sends must be storable: JSON lets it send a lone UTF-16 surrogate (``"\\ud800"``), which
no UTF-8 column, log line or answer can hold, or a NUL (``"\\u0000"``), which PostgreSQL refuses in any text,
even a query's parameter (a lookup by such a name fails with 500 there). ``check_text`` refuses such
input naming the field, before anything is stored or looked up; ``replace_surrogates`` mends values already
stored."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from webapp.services.errors import InvalidInput

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(values: Mapping[str, Any]) -> None:
    """Every string in ``values``, keys included, at any depth, must encode as UTF-8; InvalidInput names the
    first that does not (``prompt``, ``override_settings.sd_vae``, ``styles[1]``)."""
    pending: list[tuple[str, Any]] = [("", values)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise InvalidInput(f"`{path or 'body'}` holds a NUL character", field=path or "body")
            if not _storable(value):
                raise InvalidInput(f"`{path or 'body'}` is not valid Unicode text (it holds a lone surrogate)",
                                   field=path or "body")
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and (not _storable(key) or "\x00" in key):
                    raise InvalidInput(f"a key of `{path or 'body'}` is not valid Unicode text", field=path or "body")
                pending.append((f"{path}.{key}" if path else str(key), item))
        elif isinstance(value, list | tuple):
            pending.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


def _storable(text: str) -> bool:
    return text.isascii() or _LONE_SURROGATE.search(text) is None


def replace_surrogates(value: Any) -> Any:
    """``value`` with every lone surrogate, in strings and keys at any depth, replaced by U+FFFD."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [replace_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {replace_surrogates(key): replace_surrogates(item) for key, item in value.items()}
    return value
