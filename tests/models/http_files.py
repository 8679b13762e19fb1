"""A tiny HTTP file server on 127.0.0.1 for URL-import tests: files, redirects, and what it was asked.

    /files/<name>          the file's bytes (Content-Disposition names it)
    /plain/<name>          the bytes without Content-Disposition (name from the URL path)
    /redirect?to=<url>     302 to <url>
    /status/<code>         an empty answer with that status
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


@dataclass
class FileServer:
    base: str
    port: int
    requests: list[dict] = field(default_factory=list)


@contextmanager
def serve_files(files: dict[str, Path]) -> Iterator[FileServer]:
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            return

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            parts = urlsplit(self.path)
            seen.append({"path": parts.path, "query": parts.query, "headers": dict(self.headers)})
            if parts.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", parse_qs(parts.query)["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if parts.path.startswith("/status/"):
                self.send_response(int(parts.path.rsplit("/", 1)[-1]))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            kind, _, name = parts.path.strip("/").partition("/")
            if kind not in ("files", "plain") or name not in files:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = files[name].read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            if kind == "files":
                self.send_header("Content-Disposition", f'attachment; filename="{name}"')
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        yield FileServer(f"http://127.0.0.1:{port}", port, seen)
    finally:
        server.shutdown()
        server.server_close()
