"""The worker as a real process: `python -m deploy.container serve`, its stop signal, and what it imports."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.container.worker import ROOT, auth, events_of, fake_spec, read_stream
from tests.fixtures.worker_process import WorkerProcess


def test_sigterm_ends_the_running_job_interrupted_and_the_process_exits_0(tmp_path):
    worker = WorkerProcess(tmp_path / "worker", backend="fake", backend_options={"step_delay": 0.67},
                           extra_args=("--heartbeat-seconds", "0.2", "--stop-timeout-seconds", "10"))
    with worker, httpx.Client(base_url=worker.url, headers=auth(worker.secret), timeout=30) as client:
        assert client.post("/v1/jobs", content=fake_spec("slow", steps=150).to_json()).status_code == 202
        lines: list[dict] = []
        reader = threading.Thread(target=lambda: lines.extend(read_stream(client, "slow", timeout=60)))
        reader.start()
        deadline = time.monotonic() + 20
        while client.get("/v1/jobs/slow").json()["last_seq"] < 2:
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.05)
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        reader.join(30)
        assert not reader.is_alive(), "the stream did not end"
        final = events_of(lines)[-1]
        assert final["type"] == "failed" and final["kind"] == "interrupted", final
        assert worker.process.wait(timeout=30) == 0, worker.log_tail()
    log = worker.log_path.read_text(errors="replace")
    assert "Authorization" not in log and worker.secret not in log


def test_the_worker_refuses_a_short_secret_and_bad_flags(tmp_path):
    def run(*args: str, secret: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        if secret:
            env["STUDIO_WORKER_SECRET"] = secret
        return subprocess.run([sys.executable, "-m", "deploy.container", "serve", "--host", "127.0.0.1", "--port", "0",
                               "--backend", "fake", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)

    short = run(secret="short")
    assert short.returncode == 2 and "at least 16 characters" in short.stderr and "short" not in short.stdout
    bad = run("--devices", "tpu:0")
    assert bad.returncode == 2 and "--devices" in bad.stderr and "tpu:0" in bad.stderr


def test_the_container_imports_no_web_app():
    code = ("import deploy.container.server, deploy.container.serve, deploy.container.__main__, "
            "deploy.backends.local, deploy.backends.fake, sys; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('webapp', 'gradio', 'sqlmodel', 'app')); "
            "assert not bad, bad; "
            "assert 'deploy.container.server' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
