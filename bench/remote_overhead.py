"""The same txt2img through a self-hosted worker (``http`` backend → serving container process) vs the local
backend in this process, on the tiny SD1.5 model and the CPU.

    python bench/remote_overhead.py [--repeats 5] [--steps 20] [--size 64] [--preview-every 5]

Both run the job through the same ``JobRunner`` and model files from the same asset-store directory; the
remote path adds the JSON spec over HTTP, a separate process's engine, the NDJSON event stream (progress
with previews) and the base64 images back. Runs alternate between the two so machine noise hits both
alike; each one's model is loaded in a warm-up first. Throughput ratio = local time / remote time
(goal >= 0.95). On a shared machine the engine's own time swings between runs, so a paired figure is printed
too, as bench/api_overhead.py does: per job, the engine time measured inside that job divided by its wall time;
the remote share over the local share is the throughput ratio with the engine's noise cancelled out. The worker is a real process on 127.0.0.1, started exactly as tests start it.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--preview-every", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch
    from PIL import Image

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from deploy.backends.http import HttpWorkerBackend
    from deploy.backends.messages import JobSpec, Succeeded
    from pipelines.types import GenerationRequest
    from tests.backends.events import Sink
    from tests.fixtures.tiny_store import local_backend, tiny_store, worker_args
    from tests.fixtures.worker_process import WorkerProcess

    request = GenerationRequest(prompt="a lighthouse at dusk <lora:tinylora:0.8>", negative_prompt="blurry", seed=1234,
                                steps=args.steps, width=args.size, height=args.size, sampler_name="Euler a",
                                cfg_scale=7.0)
    request.validate()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_store(Path(tmp) / "store")
        sink = Sink()
        local = local_backend("local", tiny, Path(tmp) / "cache", preview_every=args.preview_every)
        local.start(sink)
        worker = WorkerProcess(Path(tmp) / "worker", backend="local",
                               extra_args=worker_args(tiny, args.preview_every)).start()
        remote = HttpWorkerBackend("remote", url=worker.url, secret=worker.secret, poll_seconds=1.0)
        remote.start(sink)
        counter = iter(range(1_000_000))
        images: dict[str, bytes] = {}

        shares: dict[str, list[float]] = {"local": [], "remote": []}

        def run(backend) -> float:  # noqa: ANN001
            job_id = f"{backend.name}-{next(counter)}"
            while backend.free_slots() < 1:  # the http backend's first health poll
                time.sleep(0.01)
            start = time.perf_counter()
            backend.submit(JobSpec(job_id=job_id, mode="txt2img", request=request, models=tiny.models))
            done = sink.wait_terminal(job_id, 600)
            elapsed = time.perf_counter() - start
            if not isinstance(done, Succeeded):
                raise SystemExit(f"{backend.name} failed: {done}")
            images[backend.name] = done.images[0]
            shares[backend.name].append(done.timings["total"] / elapsed)
            return elapsed

        try:
            run(local), run(remote)  # warm-up: each side loads the model once
            shares["local"].clear(), shares["remote"].clear()
            local_runs, remote_runs = [], []
            for i in range(args.repeats):
                pair = [(local, local_runs), (remote, remote_runs)]
                for backend, runs in pair if i % 2 == 0 else reversed(pair):
                    runs.append(run(backend))
        finally:
            remote.stop()
            local.stop()
            worker.stop()

    def pixels(png: bytes) -> bytes:
        import io

        with Image.open(io.BytesIO(png)) as image:
            return image.convert("RGB").tobytes()

    local_s, remote_s = statistics.median(local_runs), statistics.median(remote_runs)
    print(f"tiny SD1.5 {args.size}x{args.size}, {args.steps} steps, LoRA, CPU, preview every {args.preview_every}, "
          f"{args.repeats} runs each (median)")
    print(f"{'path':<58}{'seconds':>10}")
    print(f"{'local backend in this process (baseline)':<58}{local_s:>10.3f}")
    print(f"{'http backend -> serving container process on 127.0.0.1':<58}{remote_s:>10.3f}")
    print(f"runs: local {', '.join(f'{t:.3f}' for t in local_runs)}; remote {', '.join(f'{t:.3f}' for t in remote_runs)}")
    print(f"same pixels on both: {'yes' if pixels(images['local']) == pixels(images['remote']) else 'NO'}")
    ratio = local_s / remote_s
    print(f"throughput ratio local/remote: {ratio:.3f} (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}); "
          f"overhead {1000 * (remote_s - local_s):.0f} ms per job")
    # On a shared machine the engine's own time swings between runs; the share of each job's wall time that its
    # engine spent (measured inside that very job) cancels that noise out of the comparison.
    local_share, remote_share = statistics.median(shares["local"]), statistics.median(shares["remote"])
    print(f"paired: engine time / job wall time, median: local {local_share:.3f}, remote {remote_share:.3f}; "
          f"ratio remote/local {remote_share / local_share:.3f} (goal >= 0.95: "
          f"{'met' if remote_share / local_share >= 0.95 else 'NOT met'})")


if __name__ == "__main__":
    main()
