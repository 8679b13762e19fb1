"""Translation catalogs, per language other than English:

* ``locales/<language>.ui.json``: the UI's strings, English → translation (labels, buttons, headings, fixed and
  templated messages of the UI's handlers); an entry naming ``{0}`` is a template like the messages below;
* ``locales/<language>.json`` ``"ui"``: more exact strings (kept for compatibility; the ``.ui.json`` file wins);
* ``locales/<language>.json`` ``"messages"``: the services' messages;
* ``"messages"``: English message template → translation, where ``{0}``, ``{1}`` … stand for the values a message
  carries (``"no user named {0}"`` → ``"找不到名为 {0} 的用户"``). A template is matched against the whole text;
  the values are carried over unchanged, in the order the translation names them.

English needs no catalog: the source strings are English.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

LOCALES = Path(__file__).parent / "locales"
_PLACEHOLDER = re.compile(r"\{(\d+)\}")


@dataclass(frozen=True)
class Catalog:
    ui: dict[str, str]
    templates: tuple[tuple[re.Pattern[str], str], ...]
    exact: dict[str, str] = dataclasses.field(default_factory=dict)
    """Messages without values, matched whole like UI strings."""

    def lookup(self, text: str) -> str | None:
        if text in self.ui:
            return self.ui[text]
        return self.message(text, depth=1)

    def message(self, text: str, depth: int = 0) -> str | None:
        """``text`` as a message: its exact entry, else the first template matching it. A value that is itself
        a message (``"config: {0}"`` around a config error) is translated too, ``depth`` levels down."""
        if text in self.exact:
            return self.exact[text]
        if len(text) > _MAX_MESSAGE:
            return None
        for pattern, translation in self.templates:
            match = pattern.fullmatch(text)
            if match is not None:
                values = match.groups()
                if depth > 0:
                    values = tuple(self.message(v, depth - 1) or v if _WORDS.search(v) else v for v in values)
                return fill(translation, values)
        return None


_MAX_MESSAGE = 4000  # longer texts are data (a traceback, a document), not a message to match
_WORDS = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}")  # a value worth matching: words, not a name or a number


def fill(translation: str, values: tuple[str, ...]) -> str:
    """Put the matched values where the translation names them (``{1} … {0}``)."""
    def value(m: re.Match[str]) -> str:
        index = int(m.group(1))
        return values[index] if index < len(values) else m.group(0)
    return _PLACEHOLDER.sub(value, translation)


def template_pattern(template: str) -> re.Pattern[str]:
    """``"no user named {0}"`` → a regex whose groups capture the values, in placeholder order."""
    parts = _PLACEHOLDER.split(template)
    pattern = ""
    for index, part in enumerate(parts):
        pattern += re.escape(part) if index % 2 == 0 else "(.*?)"
    return re.compile(pattern, re.DOTALL)


@functools.cache
def load(language: str) -> Catalog | None:
    path = LOCALES / f"{language}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    ui = {**data.get("ui", {}), **ui_strings(language)}
    # A template not translated yet is listed with null by the extractor: it is left in English.
    messages = {k: v for k, v in data.get("messages", {}).items() if v}
    templates = {**messages, **{k: v for k, v in ui.items() if _PLACEHOLDER.search(k)}}
    # Longer templates first: the most specific one wins when several match.
    ordered = sorted(templates.items(), key=lambda kv: (-len(kv[0]), kv[0]))
    return Catalog(ui={k: v for k, v in ui.items() if not _PLACEHOLDER.search(k)},
                   templates=tuple((template_pattern(k), v) for k, v in ordered if _PLACEHOLDER.search(k)),
                   exact={k: v for k, v in messages.items() if not _PLACEHOLDER.search(k)})


@functools.cache
def ui_strings(language: str) -> dict[str, str]:
    """``locales/<language>.ui.json``: the UI's English strings and templates → their translation."""
    path = LOCALES / f"{language}.ui.json"
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text(encoding="utf-8")))


def lookup(text: str, language: str) -> str:
    if language == "en" or not text:
        return text
    catalog = load(language)
    if catalog is None:
        return text
    found = catalog.lookup(text)
    return text if found is None else found
