"""ControlNet units in A1111 infotext, written and read as sd-webui-controlnet does
(https://github.com/Mikubill/sd-webui-controlnet, `scripts/infotext.py`): one ``ControlNet N`` key per unit whose
value is ``Field Name: value`` pairs joined by ", " (A1111's infotext quoting wraps it in double quotes, since
it holds commas), field names being the unit's attribute names in Title Case, -1 values left out.

``pipelines.infotext.parse`` keeps each quoted value whole; ``units_from_infotext`` turns it back into unit
fields (the ``alwayson_scripts.controlnet.args`` shape).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.controlnet.units import ControlUnit

log = logging.getLogger(__name__)

_KEY = re.compile(r"^ControlNet (\d+)$")
# The order the extension writes them in (its unit's field order), image and flags excluded.
_FIELDS = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
           "guidance_start", "guidance_end", "pixel_perfect", "control_mode", "hr_option")
_FLOATS = ("weight", "threshold_a", "threshold_b", "guidance_start", "guidance_end")


def _display(name: str) -> str:
    return " ".join(word.capitalize() for word in name.split("_"))


_BY_DISPLAY = {_display(name): name for name in _FIELDS}


def _text(name: str, value: Any) -> str:
    if hasattr(value, "value"):  # the enums
        return str(value.value)
    if name == "processor_res":
        return str(int(value))
    if name in _FLOATS:
        return str(float(value))
    return str(value)


def unit_infotext(unit: ControlUnit, model_title: str) -> str:
    """One unit's value; ``model_title`` is its resolved model as ``name [hash8]``."""
    pairs = []
    for name in _FIELDS:
        value = model_title if name == "model" else getattr(unit, name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value == -1:
            continue
        pairs.append(f"{_display(name)}: {_text(name, value)}")
    return ", ".join(pairs)


def controlnet_params(units: Sequence[ControlUnit], model_titles: Sequence[str]) -> dict[str, str]:
    """The ``ControlNet N`` entries for ``infotext.build``'s params (empty without units)."""
    return {f"ControlNet {index}": unit_infotext(unit, title)
            for index, (unit, title) in enumerate(zip(units, model_titles, strict=True))}


def _value(name: str, text: str) -> Any:
    if name in ("pixel_perfect",):
        return text.strip().lower() == "true"
    if name == "processor_res":
        return int(float(text))
    if name in _FLOATS:
        return float(text)
    return text


def units_from_infotext(parsed: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The units of a parsed infotext (``pipelines.infotext.parse``) as unit dicts, in index order; unreadable
    pairs are skipped with a log line (infotext comes from anywhere)."""
    found: list[tuple[int, dict[str, Any]]] = []
    for key, value in parsed.items():
        match = _KEY.match(str(key))
        if not match or not isinstance(value, str):
            continue
        unit: dict[str, Any] = {"enabled": True}
        for item in value.split(", "):
            display, sep, text = item.partition(": ")
            name = _BY_DISPLAY.get(display.strip())
            if not sep or name is None:
                log.debug("infotext %s: %r ignored", key, item)
                continue
            try:
                unit[name] = _value(name, text.strip())
            except ValueError:
                log.info("infotext %s: %s value %r ignored", key, display, text)
        found.append((int(match.group(1)), unit))
    return [unit for _, unit in sorted(found, key=lambda pair: pair[0])]
