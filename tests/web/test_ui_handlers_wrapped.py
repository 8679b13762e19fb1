"""Every Gradio event function the studio registers is wrapped by ``ui_errors``.

A handler without it shows a service error or ``gr.Error`` with Gradio's console traceback and no one-line
log; walking the built Blocks' registered functions catches a handler added later without the decorator.
"""

from __future__ import annotations

import gradio as gr

from webapp.ui.context import is_ui_errors_wrapped


def _blocks(studio) -> gr.Blocks:
    return next(r.app.get_blocks() for r in studio.app.routes if getattr(r, "path", "") == "/ui")


def test_every_registered_handler_is_wrapped(studio):
    fns = [dep.fn for dep in _blocks(studio).fns.values() if dep.fn is not None]
    assert len(fns) > 20  # the walk really sees the tabs' events
    missing = sorted({getattr(fn, "__qualname__", repr(fn)) for fn in fns if not is_ui_errors_wrapped(fn)})
    assert missing == [], missing


def test_the_check_tells_a_bare_handler_apart():
    from webapp.ui.context import ui_errors

    def bare() -> None: ...

    assert not is_ui_errors_wrapped(bare)
    assert is_ui_errors_wrapped(ui_errors(bare))
