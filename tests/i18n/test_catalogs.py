"""Every fixed text of the page and every popup message of the UI has a 简体中文 and a 日本語 translation."""

from __future__ import annotations

import pytest
from gradio.i18n import I18nData
from starlette.routing import Mount

from tests.i18n.catalogs import TRANSLATED, known, popups
from webapp.i18n import translate, use_language
from webapp.ui.localize import key_for, raw_texts, text_slots

# Popup messages whose text comes from elsewhere and is translated there (service errors: the "messages" catalog).
DYNAMIC = {"context.py": "a service error's message (webapp/i18n messages catalog)",
           "controlnet_ui.py": "preprocessor warnings, each passed through translate()"}


def mounted_blocks(studio):
    return next(r.app.get_blocks() for r in studio.app.routes if isinstance(r, Mount) and r.path == "/ui")


def test_every_fixed_text_of_the_page_is_translated(studio):
    blocks = mounted_blocks(studio)
    assert raw_texts(blocks) == [], "fixed text left as a plain string (not an i18n key)"
    english = blocks.studio_texts
    assert len(english) > 300 and "Sampling steps" in english.values()
    i18n = blocks.i18n_instance.translations_dict
    missing = {lang: sorted(text for key, text in english.items() if key not in i18n[lang]) for lang in TRANSLATED}
    assert missing == {lang: [] for lang in TRANSLATED}, "labels without a translation"
    assert i18n["en"] == english
    steps = key_for("Sampling steps")
    assert (i18n["zh-CN"][steps], i18n["ja"][steps]) == ("采样步数", "サンプリングステップ数")
    # The keys Gradio sends are the ones in the dictionaries, and survive svelte-i18n (no dots or braces).
    keys = {slot.get().key for slot in text_slots(blocks) if isinstance(slot.get(), I18nData)}
    assert keys == set(english)
    assert all(key.replace("_", "").isalnum() and key.isascii() for key in keys)


def test_a_label_without_translation_is_reported(studio):
    """The check above can fail: a label added after the catalogs were written is named."""
    import gradio as gr

    from webapp.ui.localize import localize

    with gr.Blocks() as demo:
        gr.Textbox(label="Sampling steps")
        gr.Button("A caption nobody translated")
        gr.Markdown("")  # nothing to translate
    i18n = localize(demo).translations_dict
    assert raw_texts(demo) == []
    untranslated = sorted(text for key, text in demo.studio_texts.items() if key not in i18n["ja"])
    assert untranslated == ["A caption nobody translated"]


@pytest.mark.parametrize("language", TRANSLATED)
def test_every_popup_message_is_translated(language):
    catalog = known(language)
    problems = []
    for popup in popups():
        if popup.template is None:
            if popup.where.split(":")[0] not in DYNAMIC:
                problems.append(f"{popup.where}: gr.{popup.kind} of a message the catalogs cannot know")
            continue
        if popup.kind != "Error" and not popup.translated:  # ui_errors translates gr.Error; Info/Warning not
            problems.append(f"{popup.where}: gr.{popup.kind} without translate()")
        if popup.template not in catalog:
            problems.append(f"{popup.where}: no {language} translation of {popup.template!r}")
    assert problems == []


def test_templated_messages_carry_their_values():
    with use_language("ja"):
        assert translate("Token 'laptop' revoked") == "トークン 'laptop' を失効させました"
        assert translate("Signed in as **bob**") == "**bob** としてサインイン中"
    assert translate("Deleted user bob", "zh-CN") == "已删除用户 bob"
    assert translate("Deleted user bob", "en") == "Deleted user bob"
