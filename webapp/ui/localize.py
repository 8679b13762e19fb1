"""The page's fixed text in the reader's language, through Gradio's own i18n.

Tab modules write plain English. Once the page is built, ``localize`` walks every block and replaces each fixed
English string a reader sees (labels, info and placeholder texts, button captions, Markdown, tab and accordion
titles, radio and dropdown choice labels) with an ``I18nData`` key, and returns one ``gr.I18n`` holding every key
in English, 简体中文 and 日本語 (``webapp/i18n/locales/<lang>.ui.json``). The browser picks the language: Gradio's
frontend reads ``navigator.language`` when it boots, which ``webapp/web/language.py`` sets from the user's choice.

Keys are a slug of the English text plus a short hash: Gradio's frontend cuts a key at its first ``}`` and
svelte-i18n reads dots as paths, so the text itself cannot be the key. Text a handler returns at run time is not
touched here: handlers translate it with ``webapp.i18n.translate``.

Gradio does not translate ``gr.Dataframe`` headers (tried in chromium: the key shows raw), so headers stay English
strings here; a handler can send translated ones with the rows (``{"headers": [...], "data": rows}``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr
from gradio.i18n import I18nData

from webapp.i18n import LANGUAGES
from webapp.i18n.catalog import ui_strings

TEXT_PROPS = ("label", "info", "placeholder")
"""Props holding fixed text on every component that has them."""
VALUE_TEXT = (gr.Button, gr.DownloadButton, gr.UploadButton, gr.Markdown)
"""Components whose ``value`` is fixed text (a caption or a Markdown document)."""
CHOICE_LABELS = (gr.Radio, gr.Dropdown, gr.CheckboxGroup)
"""Components whose choices are ``(label, value)`` pairs; Gradio translates the labels and keeps the values."""
_WORDS = re.compile(r"[a-z]")
_ENGLISH: dict[str, str] = {}
"""key → English, for every page built in this process (keys are content hashes: pages share them safely)."""


def key_for(text: str) -> str:
    """A key svelte-i18n and Gradio keep intact: ``[a-z0-9_]`` only, unique per English text."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40]
    return f"{slug}_{hashlib.sha1(text.encode('utf-8')).hexdigest()[:10]}"


def translatable(text: Any) -> bool:
    """Whether ``text`` is fixed English a reader sees (not empty, not a bare number or symbol)."""
    return isinstance(text, str) and bool(_WORDS.search(text.lower()))


@dataclass(frozen=True)
class Slot:
    """One place in the page holding fixed text: ``block.<prop>`` (``index`` for a choice label)."""

    block: gr.blocks.Block
    prop: str
    index: int | None = None

    def get(self) -> Any:
        value = getattr(self.block, self.prop, None)
        if self.index is None:
            return value
        return value[self.index][0]

    def set(self, value: Any) -> None:
        if self.index is None:
            setattr(self.block, self.prop, value)
            return
        choices = list(getattr(self.block, self.prop))
        choices[self.index] = (value, choices[self.index][1])
        setattr(self.block, self.prop, choices)


def text_slots(demo: gr.Blocks) -> Iterator[Slot]:
    """Every place in ``demo`` that holds fixed text, translated or not yet."""
    for block in demo.blocks.values():
        for prop in TEXT_PROPS:
            if hasattr(block, prop):
                yield Slot(block, prop)
        if isinstance(block, VALUE_TEXT):
            yield Slot(block, "value")
        if isinstance(block, CHOICE_LABELS):
            for index, choice in enumerate(getattr(block, "choices", None) or []):
                if isinstance(choice, tuple | list) and len(choice) == 2:
                    yield Slot(block, "choices", index)


def raw_texts(demo: gr.Blocks) -> list[str]:
    """Fixed English text still held as a plain string (``localize`` leaves none)."""
    return [slot.get() for slot in text_slots(demo) if translatable(slot.get())]


def localize(demo: gr.Blocks) -> gr.I18n:
    """Replace the page's fixed English text by i18n keys; the ``gr.I18n`` that Gradio resolves them with.

    Also kept as ``demo.i18n_instance`` (what ``gr.mount_gradio_app(i18n=...)`` sets), and the English of every
    key as ``demo.studio_texts``.
    """
    english: dict[str, str] = {}
    for slot in text_slots(demo):
        text = slot.get()
        if not translatable(text):
            continue
        key = key_for(text)
        english[key] = _ENGLISH[key] = text
        slot.set(I18nData(key))
    dictionaries = {"en": english}
    for language in LANGUAGES:
        if language != "en":
            known = ui_strings(language)
            dictionaries[language] = {key: known[text] for key, text in english.items() if text in known}
    i18n = gr.I18n(**dictionaries)
    demo.i18n_instance = i18n
    demo.studio_texts = english  # type: ignore[attr-defined]
    return i18n


def text_of(value: Any) -> str:
    """The English of a prop ``localize`` may have replaced by a key (a handler naming a component's label)."""
    if isinstance(value, I18nData):
        return _ENGLISH.get(value.key, value.key)
    return "" if value is None else str(value)
