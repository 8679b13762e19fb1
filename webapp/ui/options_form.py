"""Widgets for any backend kind's options model, built from its pydantic ``model_fields``.

The Endpoints tab renders one group per kind from this, so a kind registered later (SageMaker) gets its form
without UI code: ``str`` → textbox, ``SecretStr`` → password box, ``int``/``float`` → number, ``bool`` →
checkbox, ``list[str]`` → one item per line, ``Literal``/``Enum`` → dropdown, ``dict`` → JSON. The values go
back as a plain options mapping that the service validates through the same model the API uses; an empty
box means "the model's default".
"""

from __future__ import annotations

import enum
import json
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import gradio as gr
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from webapp.services.errors import InvalidInput

WidgetKind = Literal["text", "secret", "int", "float", "bool", "list", "choice", "json"]


@dataclass(frozen=True)
class OptionField:
    name: str
    widget: WidgetKind
    required: bool
    default: Any
    description: str | None
    choices: tuple[str, ...] = ()


def _widget_of(annotation: Any) -> tuple[WidgetKind, tuple[str, ...]]:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        if len(kinds) == 1:
            return _widget_of(kinds[0])
        return ("text", ()) if str in kinds else ("json", ())
    if origin is Literal:
        return "choice", tuple(str(a) for a in get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "choice", tuple(str(m.value) for m in annotation)
    if origin in (list, tuple, set, frozenset):
        return "list", ()
    if origin is dict or annotation is dict:
        return "json", ()
    simple: dict[Any, WidgetKind] = {bool: "bool", int: "int", float: "float", SecretStr: "secret", str: "text"}
    return simple.get(annotation, "text"), ()


def _default(info: FieldInfo) -> Any:
    if info.default is not PydanticUndefined:
        return info.default
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return None


def describe(model: type[BaseModel]) -> list[OptionField]:
    fields = []
    for name, info in model.model_fields.items():
        widget, choices = _widget_of(info.annotation)
        fields.append(OptionField(name=name, widget=widget, required=info.is_required(), default=_default(info),
                                  description=info.description, choices=choices))
    return fields


def build_widget(field: OptionField, elem_id: str) -> gr.components.Component:
    """One widget for ``field``, showing the model's default (secrets never have one)."""
    label = field.name + (" *" if field.required else "")
    info = field.description
    default = field.default
    if field.widget == "bool":
        return gr.Checkbox(label=label, info=info, value=bool(default), elem_id=elem_id)
    if field.widget in ("int", "float") and default is None:
        # A number box cannot stay empty (the browser sends 0), and here empty must mean "the default".
        return gr.Textbox(label=label, info=(info + "; " if info else "") + "empty: the default", elem_id=elem_id)
    if field.widget in ("int", "float"):
        return gr.Number(label=label, info=info, value=default, precision=0 if field.widget == "int" else None,
                         elem_id=elem_id)
    if field.widget == "choice":
        return gr.Dropdown(label=label, info=info, choices=list(field.choices), elem_id=elem_id,
                           value=str(getattr(default, "value", default)) if default is not None else None)
    if field.widget == "secret":
        return gr.Textbox(label=label, info=info or "write-only: stored encrypted, never shown again", type="password",
                          elem_id=elem_id)
    if field.widget == "list":
        return gr.Textbox(label=label, info=(info + "; " if info else "") + "one per line", lines=2, elem_id=elem_id,
                          value="\n".join(str(v) for v in default or ()))
    if field.widget == "json":
        return gr.Textbox(label=label, info=(info + "; " if info else "") + "JSON", elem_id=elem_id,
                          value=json.dumps(default) if default not in (None, {}, []) else "")
    return gr.Textbox(label=label, info=info, elem_id=elem_id, value="" if default is None else str(default))


def read_value(field: OptionField, raw: Any) -> tuple[bool, Any]:
    """``(given, value)`` for one widget's value: an empty box is not given (the model's default applies)."""
    if field.widget == "bool":
        return True, bool(raw)
    if raw is None or (isinstance(raw, str) and raw.strip() == "" and field.widget != "secret") or raw == "":
        return False, None
    if field.widget in ("int", "float") and isinstance(raw, str):
        try:
            number = float(raw.strip())
        except ValueError:
            raise InvalidInput(f"`{field.name}` must be a number, not {raw.strip()!r}",
                               field=f"options.{field.name}") from None
        raw = number
    if field.widget == "int" and isinstance(raw, float) and raw.is_integer():
        return True, int(raw)
    if field.widget == "list":
        return True, [line.strip() for line in str(raw).splitlines() if line.strip()]
    if field.widget == "json":
        try:
            return True, json.loads(raw)
        except ValueError as exc:
            raise InvalidInput(f"`{field.name}` must be JSON: {exc}", field=f"options.{field.name}") from None
    if field.widget == "text":
        return True, str(raw).strip()
    return True, raw
