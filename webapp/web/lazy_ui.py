"""The Gradio page as a part of the studio's app that is built the first time it is needed.

Building the page (about 450 components and 180 events, then Gradio's own app around them) costs more than
everything else at start together. ``python app.py`` builds it before serving (``ready()``), so the first
visitor waits for nothing; a studio used only through its APIs — a script, a worker, most tests — never pays
for it. Either way the page is the one ``gr.mount_gradio_app`` makes, behind the same gate and middleware.

Gradio's app has a lifespan of its own (its queue, its cache cleaner): it starts with the studio's app, or at
the first request when the page is built while the studio is already serving, and stops with the studio.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import gradio as gr
from fastapi import FastAPI

_BUILDING = threading.Lock()
"""One page is built at a time in a process: Gradio keeps the page being built in a global."""


class LazyUi:
    """An ASGI app for the UI's mount point: builds the page on first use, then hands every request to it."""

    def __init__(self, build: Callable[[], gr.Blocks], mount: Callable[[FastAPI, gr.Blocks], None], path: str) -> None:
        """``build`` makes the page; ``mount(host, page)`` mounts it at ``path`` on ``host`` (a bare FastAPI app
        that only carries Gradio's mount and lifespan)."""
        self._build, self._mount, self._path = build, mount, path
        self._host: FastAPI | None = None
        self._gradio: Any = None  # Gradio's own app, mounted at ``path`` on the host
        self._serving = False  # between the studio's startup and shutdown
        self._stack: AsyncExitStack | None = None  # Gradio's lifespan while it runs

    @property
    def built(self) -> bool:
        return self._gradio is not None

    def ready(self) -> gr.Blocks:
        """Build the page now if it is not yet built; its Blocks."""
        if self._gradio is None:
            with _BUILDING:
                if self._gradio is None:
                    blocks = self._build()
                    host = FastAPI()
                    self._mount(host, blocks)
                    mounted = [route for route in host.routes if getattr(route, "path", None) == self._path]
                    self._host, self._gradio = host, mounted[-1].app
        return self._gradio.get_blocks()

    get_blocks = ready  # what Gradio's own app answers to the same question

    async def _start(self) -> None:
        if self._stack is not None or not self._serving or self._host is None:
            return
        stack = self._stack = AsyncExitStack()  # taken before awaiting: a second request does not start it again
        await stack.enter_async_context(self._host.router.lifespan_context(self._host))

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """The studio app's lifespan: Gradio's runs inside it whenever the page exists."""
        self._serving = True
        try:
            await self._start()
            yield
        finally:
            self._serving = False
            stack, self._stack = self._stack, None
            if stack is not None:
                await stack.aclose()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self._gradio is None:
            await anyio.to_thread.run_sync(self.ready)
        await self._start()
        await self._gradio(scope, receive, send)
