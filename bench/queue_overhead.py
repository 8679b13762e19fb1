"""Per-job cost of the queue: 50 tiny jobs through the real queue + dispatcher + local backend, against
the same 50 generations run by the Engine directly, in the same process, on the same tiny model.

    python bench/queue_overhead.py [--jobs 50] [--steps 4] [--size 64]

Also runs the 50 jobs on the fake backend (no model: jobs cost ~nothing), which isolates the queue's
own cost (submit, atomic claim, events, PNG into the asset store, row update). Reports ms per job
beyond the engine's own time, and lost / duplicated jobs. Goal: <= 20 ms per job, 0 lost, 0 duplicated.

    python bench/queue_overhead.py --databases [--database-url postgresql+psycopg://...]

compares the databases instead (no engine): the queue's own operations (enqueue, claim with its lease,
one lease renewal of 4 in-flight jobs, finish) and the fake-backend run end to end, on a SQLite file and on
PostgreSQL — the URL given, else a throwaway local server (``tests/fixtures/postgres.py``) — with the
ratio PostgreSQL / SQLite.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADMIN_PASSWORD = "bench-password-123"


def _request(i: int, steps: int, size: int) -> dict[str, Any]:
    return {"prompt": f"a lighthouse, variant {i % 5}", "steps": steps, "width": size, "height": size,
            "seed": 1000 + i, "sampler_name": "Euler"}


def _through_queue(studio: Any, jobs_n: int, steps: int, size: int) -> tuple[float, int, int]:
    """Seconds from the first submit to the last job done; (lost, duplicated) counted from the backend."""
    from webapp.records import JobStatus

    jobs, admin = studio.jobs, studio.users.get_by_name("admin")
    backend = jobs.backend("local")
    started: list[str] = []
    original = backend.run_job

    def counting(worker: Any, spec: Any) -> Any:
        started.append(spec.job_id)
        return original(worker, spec)

    backend.run_job = counting  # type: ignore[method-assign]
    t0 = time.perf_counter()
    ids = [jobs.submit(actor=admin, mode="txt2img", request=_request(i, steps, size)).id for i in range(jobs_n)]
    done = [jobs.wait(actor=admin, job_id=job_id, timeout=600) for job_id in ids]
    elapsed = time.perf_counter() - t0
    backend.run_job = original  # type: ignore[method-assign]
    lost = sum(1 for job in done if job.status != JobStatus.SUCCEEDED or len(job.image_keys) != 1)
    duplicated = sum(n - 1 for n in Counter(started).values() if n > 1) + len(set(started) - set(ids))
    return elapsed, lost, duplicated


def _engine_directly(studio: Any, jobs_n: int, steps: int, size: int) -> float:
    """The same generations by a fresh Engine (own pipeline cache) on the same device, one after another."""
    from pipelines.cache import PipelineCache
    from pipelines.engine import Engine
    from pipelines.types import GenerationRequest, ModelRef, ResolvedModels

    record = studio.models.checkpoint
    path = Path(studio.settings.model_cache_dir) / "bench-direct.safetensors"
    studio.store.download_to(record.store_key, path)
    cache = PipelineCache(budget_bytes=2**30, device="cpu", skeleton_dirs=studio.settings.skeleton_dirs)
    engine = Engine(cache, device="cpu", preview_every=studio.settings.preview_every)
    models = ResolvedModels(checkpoint=ModelRef(name="tiny-sd15", path=path, sha256=record.sha256,
                                                kind="checkpoint"))
    engine.generate(GenerationRequest.from_dict(_request(0, steps, size)), models)  # load + warm up
    t0 = time.perf_counter()
    for i in range(jobs_n):
        engine.generate(GenerationRequest.from_dict(_request(i, steps, size)), models)
    return time.perf_counter() - t0


def _queue_operations(url: str, n: int) -> dict[str, float]:
    """ms per call of each queue operation, on a fresh database at ``url``."""
    from webapp import schema
    from webapp.db import Database
    from webapp.records import Job, JobStatus, User
    from webapp.services.jobs.queue import JobQueue

    db = Database(url)
    try:
        schema.upgrade(db)
        with db.write() as s:
            owners = [User(username=f"bench{i}", password_hash="x") for i in range(4)]
            s.add_all(owners)
            s.flush()
            owner_ids = [(u.id, u.username) for u in owners]
        queue = JobQueue(db, max_queued_per_user=100_000, max_attempts=3)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        for i in range(n):
            owner_id, name = owner_ids[i % 4]
            queue.enqueue(Job(owner_id=owner_id, owner_name=name, mode="txt2img", endpoint="local", request_json="{}"))
        timings["enqueue"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        claimed = [queue.claim("local", worker="bench") for _ in range(n)]
        timings["claim (fair, with lease)"] = time.perf_counter() - t0
        ids = [job.id for job in claimed if job is not None]
        assert len(set(ids)) == n, "every job claimed once"
        t0 = time.perf_counter()
        for start in range(0, n, 4):
            queue.renew(ids[start:start + 4])
        timings["renew 4 leases (one UPDATE)"] = (time.perf_counter() - t0) * 4  # per call, not per job
        t0 = time.perf_counter()
        for job_id in ids:
            queue.finish(job_id, JobStatus.SUCCEEDED, image_keys_json=[f"jobs/{job_id}/0.png"])
        timings["finish"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n // 10):
            queue.reap()
        timings["reap (nothing expired)"] = (time.perf_counter() - t0) * 10
        return {name: seconds / n * 1000 for name, seconds in timings.items()}
    finally:
        db.dispose()


def compare_databases(jobs_n: int, size: int, postgres_url: str | None) -> None:
    from contextlib import ExitStack

    from tests.fixtures.studio_models import build_model_studio, tiny_model_file_set
    from webapp.settings import Settings

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        server = None
        if postgres_url is None:
            from tests.fixtures.postgres import PostgresServer, postgres_bin_dir

            bin_dir = postgres_bin_dir()
            if bin_dir is None:
                raise SystemExit("no PostgreSQL here: install it or pass --database-url")
            server = PostgresServer(bin_dir)
            stack.callback(server.stop)
            server.start()

        def fresh(kind: str, name: str) -> str:
            """An empty database of ``kind`` (a given PostgreSQL URL is used as it is, every time)."""
            if kind == "sqlite":
                return f"sqlite:///{Path(tmp) / f'{name}.db'}"
            return server.new_database() if server is not None else str(postgres_url)

        kinds = ("sqlite", "postgresql")
        operations = {kind: _queue_operations(fresh(kind, "ops"), jobs_n * 4) for kind in kinds}
        files = tiny_model_file_set()
        end_to_end: dict[str, float] = {}
        for kind in kinds:
            url = fresh(kind, "studio")

            def make(url: str = url, **overrides: Any) -> Settings:
                return Settings(data_dir=Path(tmp) / overrides.pop("name"), admin_password=ADMIN_PASSWORD,
                                database_url=url, **overrides)

            with build_model_studio(make, files, name=f"fake-{kind}", backend="fake",
                                    max_queued_jobs_per_user=10_000) as fake:
                _through_queue(fake, 5, 1, size)  # warm up
                seconds, lost, duplicated = _through_queue(fake, jobs_n, 1, size)
                assert (lost, duplicated) == (0, 0), f"{kind}: lost {lost}, duplicated {duplicated}"
                end_to_end[kind] = seconds / jobs_n * 1000

    print(f"queue operations, ms per call ({jobs_n * 4} jobs, 4 owners), and {jobs_n} fake-backend jobs end to end")
    print(f"{'measure':<40}{'SQLite':>10}{'PostgreSQL':>12}{'ratio':>8}")
    for name, sqlite_ms in operations["sqlite"].items():
        pg_ms = operations["postgresql"][name]
        print(f"{name:<40}{sqlite_ms:>10.2f}{pg_ms:>12.2f}{pg_ms / sqlite_ms:>8.2f}")
    print(f"{'fake backend, submit to done, per job':<40}{end_to_end['sqlite']:>10.2f}"
          f"{end_to_end['postgresql']:>12.2f}{end_to_end['postgresql'] / end_to_end['sqlite']:>8.2f}")
    print("lost: 0, duplicated: 0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="alternate engine/queue runs this many times")
    parser.add_argument("--databases", action="store_true", help="compare SQLite and PostgreSQL (no engine)")
    parser.add_argument("--database-url", help="with --databases: this PostgreSQL instead of a throwaway server")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.databases:
        compare_databases(args.jobs, args.size, args.database_url)
        return

    import torch

    torch.set_num_threads(2)
    from tests.fixtures.studio_models import build_model_studio, tiny_model_file_set
    from webapp.settings import Settings

    files = tiny_model_file_set()
    with tempfile.TemporaryDirectory() as tmp:
        def make(**overrides: Any) -> Settings:
            return Settings(data_dir=Path(tmp) / overrides.pop("name"), admin_password=ADMIN_PASSWORD, **overrides)

        with build_model_studio(make, files, name="fake", backend="fake", max_queued_jobs_per_user=10_000) as fake:
            _through_queue(fake, 5, 1, args.size)  # warm up
            fake_s, fake_lost, fake_dup = _through_queue(fake, args.jobs, 1, args.size)

        engine_runs, queue_runs, lost, duplicated = [], [], 0, 0
        with build_model_studio(make, files, name="local", backend="local", devices="cpu", preview_every=0,
                                max_queued_jobs_per_user=10_000) as local:
            _through_queue(local, 2, args.steps, args.size)  # loads the model on the worker
            for _ in range(args.rounds):
                engine_runs.append(_engine_directly(local, args.jobs, args.steps, args.size))
                seconds, run_lost, run_dup = _through_queue(local, args.jobs, args.steps, args.size)
                queue_runs.append(seconds)
                lost += run_lost
                duplicated += run_dup

    n = args.jobs
    engine_s, queue_s = statistics.median(engine_runs), statistics.median(queue_runs)
    per_round = sorted((q - e) / n * 1000 for q, e in zip(queue_runs, engine_runs, strict=True))
    overhead_ms = statistics.median(per_round)
    print(f"{n} jobs, tiny SD1.5 {args.size}x{args.size}, {args.steps} steps, CPU, {args.rounds} rounds (median)")
    print(f"{'measure':<52}{'total s':>10}{'per job ms':>12}")
    print(f"{'Engine.generate directly (baseline)':<52}{engine_s:>10.2f}{engine_s / n * 1000:>12.1f}")
    print(f"{'queue + dispatcher + local backend':<52}{queue_s:>10.2f}{queue_s / n * 1000:>12.1f}")
    print(f"{'queue + dispatcher + fake backend (queue alone)':<52}{fake_s:>10.2f}{fake_s / n * 1000:>12.1f}")
    print(f"ratio queue/engine: {queue_s / engine_s:.3f}x; overhead beyond the engine: {overhead_ms:.1f} ms/job "
          f"(median of per-round differences; rounds ranged {per_round[0]:.1f} .. {per_round[-1]:.1f}); "
          f"queue alone: {fake_s / n * 1000:.1f} ms/job")
    print(f"lost: {lost + fake_lost}, duplicated: {duplicated + fake_dup}")
    print(f"goal <= 20 ms per job beyond the engine: {'met' if overhead_ms <= 20 else 'NOT met'}")


if __name__ == "__main__":
    main()
