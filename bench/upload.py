"""Browser-path upload of a big model file: server peak RSS and throughput vs a plain file copy.

    python bench/upload.py [--size-gb 2] [--chunk-mb 16]

Starts ``python app.py`` as a subprocess on a temp data dir, generates a LoRA-shaped safetensors file
of the given size, uploads it through the real chunked HTTP protocol (/api/v1/uploads, the same calls
uploader.js makes), samples the server's RSS (psutil, with children) every 20 ms, then completes the
upload and times the import (hash + store copy). The baseline is ``shutil.copyfile`` of the same file
on the same disk, measured in the same run. Goal: server peak RSS under 300 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "bench-password-123"
MB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_lora(path: Path, size: int) -> Path:
    """A kohya-named LoRA whose one tensor fills `size` bytes (the probe reads only the header)."""
    columns = max(1, (size - 256) // (4 * 4))
    header = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
              {"dtype": "F32", "shape": [4, columns], "data_offsets": [0, 16 * columns]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    block = os.urandom(MB)
    remaining = 16 * columns
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        while remaining:
            step = min(remaining, MB)
            f.write(block[:step])
            remaining -= step
    return path


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.baseline = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):  # a child that just exited
                total += child.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._rss())
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self.baseline = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def put_chunk(base: str, cookie: str, upload_id: str, path: Path, start: int, end: int, total: int) -> int:
    """One PUT with the body sent by ``socket.sendfile`` (zero-copy), as a browser streams a Blob slice.

    A Python HTTP client would be the bottleneck here (it copies every byte through the interpreter);
    this measures the server.
    """
    host, port = base.removeprefix("http://").split(":")
    head = (f"PUT /api/v1/uploads/{upload_id} HTTP/1.1\r\nHost: {host}:{port}\r\nCookie: {cookie}\r\n"
            f"Content-Range: bytes {start}-{end - 1}/{total}\r\nContent-Length: {end - start}\r\n"
            "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n")
    with socket.create_connection((host, int(port))) as sock, path.open("rb") as f:
        sock.sendall(head.encode())
        sock.sendfile(f, offset=start, count=end - start)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    if status != 200:
        raise SystemExit(f"chunk at {start} failed: {reply[-300:]!r}")
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])["received"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--chunk-mb", type=int, default=16)
    args = parser.parse_args()
    size = int(args.size_gb * 1024**3)
    with tempfile.TemporaryDirectory(prefix="bench-upload-", dir=ROOT / "data" if (ROOT / "data").is_dir() else None) as tmp:
        tmp_path = Path(tmp)
        source = make_lora(tmp_path / "big-lora.safetensors", size)
        size = source.stat().st_size
        start = time.perf_counter()
        shutil.copyfile(source, tmp_path / "copy.bin")
        copy_seconds = time.perf_counter() - start
        (tmp_path / "copy.bin").unlink()

        port = _free_port()
        env = dict(os.environ, STUDIO_ADMIN_PASSWORD=PASSWORD, STUDIO_MAX_UPLOAD_GB=str(args.size_gb + 1))
        server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--data-dir",
                                   str(tmp_path / "data")], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base, timeout=120) as client:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        client.get("/login")
                        break
                    except httpx.HTTPError:
                        if time.monotonic() > deadline or server.poll() is not None:
                            raise SystemExit("the server did not start") from None
                        time.sleep(0.1)
                client.post("/login", data={"username": "admin", "password": PASSWORD})
                chunk = args.chunk_mb * MB
                with RssSampler(server.pid) as rss:
                    upload = client.post("/api/v1/uploads", json={"file_name": source.name, "size": size,
                                                                  "type": "lora"}).json()
                    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
                    cpu_before = sum(psutil.Process(server.pid).cpu_times()[:2])
                    start = time.perf_counter()
                    for offset in range(0, size, chunk):
                        end = min(offset + chunk, size)
                        assert put_chunk(base, cookie, upload["id"], source, offset, end, size) == end
                    upload_seconds = time.perf_counter() - start
                    upload_cpu = sum(psutil.Process(server.pid).cpu_times()[:2]) - cpu_before
                    upload_peak = rss.peak
                    start = time.perf_counter()
                    task = client.post(f"/api/v1/uploads/{upload['id']}/complete").json()
                    while not (task := client.get(f"/api/v1/tasks/{task['id']}").json())["finished"]:
                        time.sleep(0.2)
                    import_seconds = time.perf_counter() - start
                status = task["items"][0]
        finally:
            server.terminate()
            server.wait(timeout=30)
    gb = size / 1024**3
    print(f"file: {gb:.2f} GiB LoRA-shaped safetensors, chunks of {args.chunk_mb} MiB")
    print(f"{'measure':<48}{'seconds':>10}{'MiB/s':>10}")
    print(f"{'shutil.copyfile (baseline, same disk)':<48}{copy_seconds:>10.2f}{size / MB / copy_seconds:>10.0f}")
    print(f"{'upload through /api/v1/uploads (HTTP, chunked)':<48}{upload_seconds:>10.2f}"
          f"{size / MB / upload_seconds:>10.0f}")
    print(f"{'import after upload (probe, sha256, store copy)':<48}{import_seconds:>10.2f}"
          f"{size / MB / import_seconds:>10.0f}")
    print(f"upload throughput / plain copy: {copy_seconds / upload_seconds:.2f}x; server CPU during the upload: "
          f"{upload_cpu:.2f} s ({upload_cpu / upload_seconds:.0%} of one core)")
    print(f"server RSS: {rss.baseline / MB:.0f} MiB idle, peak {upload_peak / MB:.0f} MiB during upload, "
          f"{rss.peak / MB:.0f} MiB including import; goal < 300 MiB: "
          f"{'met' if rss.peak < 300 * MB else 'NOT met'}")
    print(f"import result: {status['state']} — {status.get('message')}")


if __name__ == "__main__":
    main()
