"""Per-job overhead of a SageMaker endpoint, async and real-time, against the local backend, on the tiny SD1.5
model and the CPU.

    python bench/sagemaker_overhead.py [--jobs 5] [--polls 0.1,1] [--steps 20] [--size 64] [--preview-every 5]

The paths, each running the same txt2img (a LoRA, previews every ``--preview-every`` steps):

* local: ``LocalBackend`` in this process (the baseline);
* real-time: ``SageMakerBackend`` → ``invoke_endpoint`` → the runtime router → our serving container process
  running the local backend, which reads the model from the S3 store and writes the PNG back to it;
* async, once per poll interval: the same, with the spec put in S3, ``invoke_endpoint_async``, the router
  calling the container on a thread and writing the answer to S3, and the backend's watcher collecting it by
  polling S3 every ``poll_seconds``.

The "cloud" is the tests' local data plane (``tests/fixtures/sagemaker_router.py``): moto in this process for S3
and the SageMaker control plane, the container as a real process on 127.0.0.1. So the figures show what our
code adds (S3 round trips, the router hop, JSON over HTTP, polling), not AWS's own latency, which comes on top.

Each path runs one warm-up job first (the model loads in it; excluded), then ``--jobs`` jobs, the paths taking
turns in a rotating order so machine noise hits all alike. Per job: wall time from ``submit`` to the terminal
event; the engine time measured inside the job (``timings["total"]``) is printed too, and wall − engine is
the overhead with the engine's own swings cancelled. Ratios and overheads are against the local median.
An async job waits, on average, about half a poll interval for its answer to be seen: the two intervals show it.
On a machine with few cores a short poll is not free either: its three S3 reads per poll are served by moto in
this process and take CPU from the container's engine (compare the engine times printed per run); on AWS that
cost lands on the studio's host and S3, not on the endpoint's instance.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/studio-worker:bench"
PROGRESS_INTERVAL = 1.0
"""The container's ``--progress-interval-seconds`` (its default): async progress objects at most this often."""
STATE_SECONDS = 30.0
"""The backend describes its endpoint this often; longer than any poll, so the watcher wakes at the poll."""


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]


def sagemaker_backend(plane: Any, name: str, endpoint_type: str, poll_seconds: float) -> Any:
    """A studio endpoint that provisions its SageMaker endpoint in moto, routed to the data plane's container."""
    from deploy.backends.registry import BackendConfig, create_backend
    from tests.fixtures.sagemaker_router import CONTAINER_URL_VARIABLE, ROLE_ARN

    config = BackendConfig(
        name=name, kind="sagemaker", store=plane.store, provision=True, min_instances=1, max_instances=1,
        autoscale=False,
        options={"endpoint_type": endpoint_type, "image_uri": IMAGE, "role_arn": ROLE_ARN, "slots": 1,
                 "state_seconds": STATE_SECONDS, "poll_seconds": poll_seconds,
                 "environment": {CONTAINER_URL_VARIABLE: plane.container.url}})
    return create_backend(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5, help="measured jobs per path, after one warm-up each")
    parser.add_argument("--polls", default="0.1,1", help="async poll intervals in seconds, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--preview-every", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()
    polls = [float(p) for p in args.polls.split(",") if p.strip()]
    if args.jobs < 1 or not polls or min(polls) <= 0:
        parser.error("--jobs must be >= 1 and --polls positive seconds")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request at INFO

    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from deploy.backends.messages import JobSpec, Succeeded
    from pipelines.types import GenerationRequest
    from tests.backends.events import Sink
    from tests.fixtures.moto_server import acquire_moto_server, aws_environment, release_moto_server
    from tests.fixtures.sagemaker_router import running_data_plane
    from tests.fixtures.tiny_store import engine_args, local_backend, put_tiny_models, tiny_store

    request = GenerationRequest(prompt="a lighthouse at dusk <lora:tinylora:0.8>", negative_prompt="blurry", seed=1234,
                                steps=args.steps, width=args.size, height=args.size, sampler_name="Euler a",
                                cfg_scale=7.0)
    request.validate()
    sink = Sink()
    counter = iter(range(1_000_000))
    walls: dict[str, list[float]] = {}
    engines: dict[str, list[float]] = {}

    def run(label: str, backend: Any, models: Any, record: bool = True) -> None:
        job_id = f"{label.split()[0]}-{next(counter)}"
        deadline = time.monotonic() + 60
        while backend.free_slots() < 1:  # a SageMaker backend's first look at its endpoint
            if time.monotonic() > deadline:
                raise SystemExit(f"{label}: no free slot after 60s ({backend.status()})")
            time.sleep(0.01)
        start = time.perf_counter()
        backend.submit(JobSpec(job_id=job_id, mode="txt2img", request=request, models=models))
        done = sink.wait_terminal(job_id, 600)
        elapsed = time.perf_counter() - start
        if not isinstance(done, Succeeded):
            raise SystemExit(f"{label} failed: {done}")
        if record:
            walls.setdefault(label, []).append(elapsed)
            engines.setdefault(label, []).append(float(done.timings.get("total", 0.0)))

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_store(Path(tmp) / "store")
        local = local_backend("local", tiny, Path(tmp) / "cache", preview_every=args.preview_every)
        moto = acquire_moto_server()
        backends: list[Any] = []
        try:
            with aws_environment(moto), running_data_plane(
                    moto, Path(tmp) / "container", backend="local",
                    extra_args=(*engine_args(tiny.files, args.preview_every),
                                "--progress-interval-seconds", str(PROGRESS_INTERVAL))) as plane:
                s3_models = put_tiny_models(plane.store, tiny.files)
                paths: list[tuple[str, Any, Any]] = [("local (baseline)", local, tiny.models)]
                realtime = sagemaker_backend(plane, "bench-realtime", "realtime", 1.0)
                paths.append(("real-time", realtime, s3_models))
                for poll in polls:
                    name = f"bench-async-{round(poll * 1000)}ms"
                    paths.append((f"async poll {poll:g}s", sagemaker_backend(plane, name, "async", poll), s3_models))
                for _label, backend, _models in paths:
                    backend.start(sink)
                    backends.append(backend)
                for label, backend, models in paths:  # warm-up: the model loads here (and in the container once)
                    run(label, backend, models, record=False)
                for i in range(args.jobs):
                    turn = i % len(paths)
                    for label, backend, models in paths[turn:] + paths[:turn]:
                        run(label, backend, models)
                for backend in backends:
                    backend.stop()
                    if backend is not local:
                        backend.teardown()
                backends.clear()
                plane.wait_async_idle()
        finally:
            for backend in backends:
                backend.stop()
            release_moto_server()

    base = statistics.median(walls["local (baseline)"])
    base_outside = statistics.median(w - e for w, e in zip(walls["local (baseline)"], engines["local (baseline)"],
                                                           strict=True))
    rows = []
    for label, times in walls.items():
        median = statistics.median(times)
        outside = statistics.median(w - e for w, e in zip(times, engines[label], strict=True))
        rows.append({"path": label, "median_s": median, "p90_s": p90(times), "ratio": median / base,
                     "overhead_s": median - base, "outside_engine_s": outside,
                     "overhead_engine_cancelled_s": outside - base_outside,
                     "ratio_engine_cancelled": (base + outside - base_outside) / base,
                     "runs_s": times, "engine_s": engines[label]})
    setup = {"model": "tiny SD1.5", "size": args.size, "steps": args.steps, "lora": True, "device": "cpu",
             "preview_every": args.preview_every, "jobs_per_path": args.jobs, "warmup_per_path": 1,
             "async_poll_seconds": polls, "container_progress_interval_seconds": PROGRESS_INTERVAL,
             "state_seconds": STATE_SECONDS, "load_average": {"before": load_before, "after": os.getloadavg()[0]},
             "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps({"setup": setup, "paths": rows}, indent=2))
        return
    print(f"tiny SD1.5 {args.size}x{args.size}, {args.steps} steps, LoRA, CPU, preview every {args.preview_every}; "
          f"{args.jobs} jobs per path after 1 warm-up each (model loading excluded); container progress every "
          f"{PROGRESS_INTERVAL:g}s; local data plane (moto + router + container process on 127.0.0.1); "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'path':<20}{'median s':>9}{'p90 s':>8}{'ratio':>7}{'overhead s':>12}{'wall-engine s':>15}"
          f"{'overhead* s':>13}{'ratio*':>8}")
    for row in rows:
        print(f"{row['path']:<20}{row['median_s']:>9.3f}{row['p90_s']:>8.3f}{row['ratio']:>7.2f}"
              f"{row['overhead_s']:>12.3f}{row['outside_engine_s']:>15.3f}{row['overhead_engine_cancelled_s']:>13.3f}"
              f"{row['ratio_engine_cancelled']:>8.2f}")
    for row in rows:
        print(f"runs {row['path']}: {', '.join(f'{t:.3f}' for t in row['runs_s'])} "
              f"(engine {', '.join(f'{t:.3f}' for t in row['engine_s'])})")
    print("ratio = median / local median; overhead = median - local median (both swing with the engine's own time "
          "on a busy machine); wall-engine = median over jobs of (wall time - engine time inside that job); "
          "overhead* = wall-engine - local wall-engine, ratio* = (local median + overhead*) / local median: the "
          "same figures with the engine's swings cancelled")

if __name__ == "__main__":
    main()
