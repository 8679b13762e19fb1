"""Seconds from ``python app.py`` to the login page served, median of N, beside a bare ``import gradio``.

    python bench/cold_start.py [--runs 5]

Goal: at most 5 s on a 2-core machine. torch/diffusers must not be on this path.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_app_start(data_dir: Path) -> float:
    port = _free_port()
    env = dict(os.environ, STUDIO_ADMIN_PASSWORD="bench-password-123")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--data-dir", str(data_dir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=1) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def time_import_gradio() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import gradio"], check=True)
    return time.perf_counter() - start


def time_import_torch_check() -> bool:
    """True when app.py's import graph pulls in torch (it must not)."""
    code = "import sys; sys.argv=['app.py']; import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip().endswith("True")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    app_times, gradio_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            app_times.append(time_app_start(Path(tmp) / f"fresh-{i}"))  # first start: schema + admin account
            gradio_times.append(time_import_gradio())
        restart = [time_app_start(Path(tmp) / "fresh-0") for _ in range(args.runs)]
    med_app, med_restart, med_gradio = (statistics.median(x) for x in (app_times, restart, gradio_times))
    print(f"{'measure':<40}{'median s':>10}{'min s':>10}{'max s':>10}")
    for name, values in (
        ("python app.py -> /login (first start)", app_times),
        ("python app.py -> /login (restart)", restart),
        ('python -c "import gradio"', gradio_times),
    ):
        print(f"{name:<40}{statistics.median(values):>10.2f}{min(values):>10.2f}{max(values):>10.2f}")
    print(f"ratio app first start / import gradio: {med_app / med_gradio:.2f}x; restart: {med_restart / med_gradio:.2f}x")
    print(f"goal <= 5 s: {'met' if med_app <= 5 else 'NOT met'}; torch imported on start-up path: {time_import_torch_check()}")


if __name__ == "__main__":
    main()
