"""Files that UI handlers may read: only what Gradio received from an upload, never a path a client names.

Gradio runs every event over HTTP with ``data`` the client controls, so a file input can arrive as
``{"path": "/any/server/file", "meta": {"_type": "gradio.FileData"}}``. Gradio's own guard
(``processing_utils._check_allowed``: during preprocessing only files inside its upload folder pass) is
skipped until ``Blocks.has_launched`` is set, which ``launch()`` does and ``mount_gradio_app`` does not —
so a mounted app copies any readable server file into its cache and hands it to the handler.
`guard_uploads` turns that check on for our mounted Blocks; `read_upload` is the handlers' own check, so a
handler never opens a path outside Gradio's upload folder whatever reaches it.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

MAX_IMAGE_BYTES = 64 * 1024 * 1024
"""The largest image file a UI handler reads (PNG Info, img2img's Upload image)."""


def guard_uploads(blocks: gr.Blocks) -> None:
    """Make Gradio refuse, before copying, any input file that is not in its upload folder.

    ``has_launched`` is read by nothing but that check (gradio 6: ``processing_utils._check_allowed``).
    """
    blocks.has_launched = True


def upload_path(path: str | Path) -> Path:
    """`path` resolved (symlinks too) if it lies inside Gradio's upload folder; otherwise ``gr.Error``.

    Gradio's notion of the folder is used (``GRADIO_TEMP_DIR`` or its default), never a fixed /tmp.
    """
    folder = Path(get_upload_folder()).resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(folder) or not resolved.is_file():
        raise gr.Error("That is not a file uploaded in this page; drop the file again")
    return resolved


def read_upload(path: str | Path, *, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of an uploaded file, refusing files over `max_bytes` before reading them."""
    resolved = upload_path(path)
    if resolved.stat().st_size > max_bytes:
        raise gr.Error(f"The {what} is larger than {max_bytes // 2**20} MB")
    return resolved.read_bytes()
