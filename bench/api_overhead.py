"""txt2img through the A1111 HTTP API vs the engine called directly, on the same tiny SD1.5 model.

    python bench/api_overhead.py [--runs 7] [--size 512] [--steps 20]

The HTTP path is the whole product: Basic auth at the gate, request checks, per-user options,
``JobService.submit`` (database row), the dispatcher and local backend (model file cache), the
engine, PNGs into the asset store, the waiting request woken, base64 answer. The direct path is
``Engine.generate`` on a ``PipelineCache`` with the same device, dtype and preview setting. Runs
alternate between the two so machine noise hits both alike. Ratio = direct time / HTTP time
(goal >= 0.97x). On a shared machine the engine's own time swings between runs, so a second, paired
figure is printed too: for each HTTP request, the engine time measured inside that very job divided by
the request's wall time (noise in the engine cancels out of it).

A second table shows what one authenticated request costs: HTTP Basic with the verified-credential
cache, without it (argon2 on every request, as before), and a Bearer token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

PASSWORD = "bench-password-123"


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def direct_engine(files, preview_every: int):  # noqa: ANN001, ANN201 - bench helper
    import torch

    from pipelines.cache import PipelineCache
    from pipelines.engine import Engine
    from pipelines.hashes import sha256_file
    from pipelines.types import ModelRef, ResolvedModels

    cache = PipelineCache(budget_bytes=1 << 30, device="cpu", dtype=torch.float32, skeleton_dirs=[files.skeleton_root])
    engine = Engine(cache, device="cpu", dtype=torch.float32, preview_every=preview_every)
    sha = sha256_file(files.checkpoint)
    models = ResolvedModels(checkpoint=ModelRef(name="tiny-sd15", path=files.checkpoint, sha256=sha, kind="checkpoint"))
    return engine, models


def auth_costs(base: str, studio, runs: int) -> list[tuple[str, float]]:  # noqa: ANN001
    import httpx

    token, _ = studio.tokens.create(actor=studio.users.get_by_name("admin"), name="bench")
    results = []
    for label, kwargs, cache_seconds in (
        ("Basic, verified-credential cache", {"auth": ("admin", PASSWORD)}, 60.0),
        ("Basic, no cache (argon2 each time)", {"auth": ("admin", PASSWORD)}, 0.0),
        ("Bearer token", {"headers": {"authorization": f"Bearer {token}"}}, 60.0),
    ):
        studio.auth.credential_cache_seconds = cache_seconds
        studio.auth.forget_credentials()
        with httpx.Client(base_url=base, timeout=60, **kwargs) as http:
            http.get("/sdapi/v1/progress").raise_for_status()  # warm (fills the cache when on)
            times = []
            for _ in range(runs * 5):
                start = time.perf_counter()
                http.get("/sdapi/v1/progress").raise_for_status()
                times.append(time.perf_counter() - start)
        results.append((label, _median_ms(times)))
    studio.auth.credential_cache_seconds = 60.0
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--size", type=int, default=512, help="A1111's default width and height")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--preview-every", type=int, default=5, help="as the studio's default setting")
    args = parser.parse_args()

    import httpx
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from pipelines.types import GenerationRequest
    from tests.fixtures.studio_models import build_model_studio, tiny_model_file_set
    from tests.live import serve
    from webapp.settings import Settings

    files = tiny_model_file_set()
    engine, models = direct_engine(files, args.preview_every)
    body = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "seed": 1234, "steps": args.steps,
            "width": args.size, "height": args.size, "sampler_name": "Euler a", "cfg_scale": 7}
    request = GenerationRequest(mode="txt2img", prompt=body["prompt"], negative_prompt=body["negative_prompt"],
                                seed=1234, steps=args.steps, width=args.size, height=args.size, sampler_name="Euler a",
                                cfg_scale=7.0)
    with tempfile.TemporaryDirectory() as tmp:
        def make_settings(**values):  # noqa: ANN003, ANN202
            return Settings(data_dir=Path(tmp) / "data", admin_password=PASSWORD, **values)

        with build_model_studio(make_settings, files, preview_every=args.preview_every, devices="cpu") as built, \
                serve(built.studio.app) as base, httpx.Client(base_url=base, auth=("admin", PASSWORD),
                                                              timeout=600) as http:
            shares: list[float] = []

            def via_http() -> float:
                start = time.perf_counter()
                response = http.post("/sdapi/v1/txt2img", json=body)
                response.raise_for_status()
                elapsed = time.perf_counter() - start
                assert response.json()["images"], response.text
                job_id = json.loads(response.json()["info"])["job_id"]
                job = built.studio.jobs.get(actor=built.admin, job_id=job_id)
                shares.append(job.timings["total"] / elapsed)
                return elapsed

            def via_engine() -> float:
                start = time.perf_counter()
                result = engine.generate(request, models)
                assert result.images
                return time.perf_counter() - start

            via_http(), via_engine()  # warm-up: model loads, first-call allocations
            shares.clear()
            direct, http_times = [], []
            for _ in range(args.runs):
                direct.append(via_engine())
                http_times.append(via_http())
            auth = auth_costs(base, built.studio, args.runs)

    med_direct, med_http = statistics.median(direct), statistics.median(http_times)
    print(f"txt2img {args.size}x{args.size}, {args.steps} steps, Euler a, tiny SD1.5 on CPU "
          f"({torch.get_num_threads()} threads), {args.runs} runs each, alternating")
    print(f"{'path':<44}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
    for name, values in (("engine.generate (direct)", direct), ("POST /sdapi/v1/txt2img (HTTP, queue)", http_times)):
        print(f"{name:<44}{_median_ms(values):>12.1f}{min(values) * 1000:>10.1f}{max(values) * 1000:>10.1f}")
    ratio = med_direct / med_http
    share = statistics.median(shares)
    print(f"overhead per request: {(med_http - med_direct) * 1000:.1f} ms; "
          f"ratio direct/HTTP (medians): {ratio:.3f}x (goal >= 0.97x: {'met' if ratio >= 0.97 else 'NOT met'})")
    print(f"paired: engine time inside each job / that request's wall time, median {share:.3f}x "
          f"(min {min(shares):.3f}, max {max(shares):.3f}; goal >= 0.97x: {'met' if share >= 0.97 else 'NOT met'})")
    print()
    print(f"{'GET /sdapi/v1/progress, authenticated by':<44}{'median ms':>12}")
    for label, ms in auth:
        print(f"{label:<44}{ms:>12.2f}")
    cached, uncached = auth[0][1], auth[1][1]
    print(f"Basic with the cache: {uncached / cached:.1f}x faster than argon2 per request")


if __name__ == "__main__":
    main()
