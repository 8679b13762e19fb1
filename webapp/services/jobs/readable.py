"""Job rows made safe to answer with, whatever they hold.

Submission refuses text that is not valid Unicode, but rows written before that check (or edited by hand,
or cut short) may still hold a lone UTF-16 surrogate as a JSON escape (``"\\ud800"``), JSON that does not
parse, or a value of the wrong type. Decoded as they are, such rows make every answer that shows them fail
(UTF-8 cannot encode a lone surrogate), so one bad job would break its owner's history for good. Rows read
for answers pass through ``readable``: the bad text is replaced (U+FFFD, or the column's empty value) in
memory only, and logged. The dispatcher reads rows on its own path and still fails a job it cannot run.
"""

from __future__ import annotations

import json
import logging
import re

from webapp.records import Job
from webapp.services.text import replace_surrogates

log = logging.getLogger(__name__)

# Column -> its empty value; the decoded value must have the empty value's type (None: an object or null).
_JSON_COLUMNS: dict[str, str | None] = {
    "request_json": "{}", "models_json": "{}", "image_keys_json": "[]", "infotexts_json": "[]",
    "info_json": None, "warnings_json": "[]", "timings_json": "{}", "metrics_json": None, "artifact_keys_json": "[]",
}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def readable(job: Job) -> Job:
    """``job`` with every JSON column decodable, of its type, and free of lone surrogates (in memory)."""
    for column, empty in _JSON_COLUMNS.items():
        text = getattr(job, column)
        if not text:
            continue
        fixed = _readable_json(text, empty)
        if fixed != text:
            log.warning("job %s: stored %s was not readable; answering with it repaired", job.id, column)
            setattr(job, column, fixed)
    return job


def _readable_json(text: str, empty: str | None) -> str | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return empty
    expected = list if empty == "[]" else dict
    if not isinstance(value, expected) and not (empty is None and value is None):
        return empty
    if not _SURROGATE_ESCAPE.search(text) and text.isascii():
        return text
    cleaned = replace_surrogates(value)
    return text if cleaned == value else json.dumps(cleaned)
