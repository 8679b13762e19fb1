"""What the tests check the catalogs against: the page's fixed text and the UI's popup messages."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

from webapp.i18n.catalog import LOCALES, ui_strings

UI_SOURCES = Path(__file__).resolve().parents[2] / "webapp" / "ui"
TRANSLATED = ("zh-CN", "ja")
POPUPS = ("Info", "Warning", "Error")


def known(language: str) -> set[str]:
    """Every English string and template a catalog of ``language`` translates."""
    path = LOCALES / f"{language}.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {*data.get("ui", {}), *data.get("messages", {}), *ui_strings(language)}


@dataclass(frozen=True)
class Popup:
    where: str
    kind: str
    template: str | None
    """The message as a catalog template (``{0}`` for each value), None when it is not written out here."""
    translated: bool
    """Passed through ``translate(...)`` at the call."""


def _template(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts, index = [], 0
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            else:
                parts.append("{" + str(index) + "}")
                index += 1
        return "".join(parts)
    return None


def popups() -> list[Popup]:
    """Every ``gr.Info`` / ``gr.Warning`` / ``gr.Error`` call in ``webapp/ui``."""
    found = []
    for path in sorted(UI_SOURCES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in POPUPS and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "gr" and node.args):
                continue
            message = node.args[0]
            translated = (isinstance(message, ast.Call) and isinstance(message.func, ast.Name)
                          and message.func.id == "translate" and bool(message.args))
            if translated:
                message = message.args[0]
            found.append(Popup(f"{path.name}:{node.lineno}", node.func.attr, _template(message), translated))
    return found
