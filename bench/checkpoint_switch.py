"""Switching to a cached checkpoint against loading it cold, through the production PipelineCache.

    python bench/checkpoint_switch.py [--runs 7] [--size 128] [--steps 10]

Two tiny SD1.5 A1111 single files (different weights) are loaded by ``PipelineCache`` with the tiny
skeletons. Cold = ``get()`` on an empty cache (read, convert, build the pipeline). Switch = what a job
pays extra when the previous job used the other (cached) checkpoint. Whole-job times are too noisy on a
shared machine for a difference of a few milliseconds, so each job's set-up time (from ``generate()``
to the first UNet call: cache lookup, derived pipelines, prompt encoding) is measured too, alternating
A/B against repeating A. Goal: switch ≤ 5 % of cold.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipelines.cache import PipelineCache  # noqa: E402
from pipelines.engine import Engine  # noqa: E402
from pipelines.types import GenerationRequest, ModelRef, ResolvedModels  # noqa: E402
from tests.tiny.fixtures import build_pipeline, tiny_files, write_single_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 avoids OpenMP spin-waits distorting ratios on a shared machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    files = tiny_files()
    path_a = files.checkpoint("sd15")
    path_b = write_single_file(build_pipeline("sd15", files.tokenizer_dir, seed=7), files.root / "bench" / "b.safetensors")
    refs = {p: ModelRef(p.name, p, hashlib.sha256(p.read_bytes()).hexdigest(), "checkpoint") for p in (path_a, path_b)}
    skeletons = [files.skeleton_root]

    def cold() -> float:
        cache = PipelineCache(budget_bytes=2**30, skeleton_dirs=skeletons)
        start = time.perf_counter()
        cache.get(path_a, refs[path_a].sha256)
        return time.perf_counter() - start

    cache = PipelineCache(budget_bytes=2**30, skeleton_dirs=skeletons)
    engine = Engine(cache)

    first_unet: list[float] = []

    def mark(*_args) -> None:
        if not first_unet:
            first_unet.append(time.perf_counter())

    for p in (path_a, path_b):
        cache.get(p, refs[p].sha256).unet.register_forward_pre_hook(mark)

    def job(path: Path) -> tuple[float, float]:
        request = GenerationRequest(prompt="a photo of a cat", steps=args.steps, width=args.size, height=args.size,
                                    seed=3, sampler_name="Euler")
        first_unet.clear()
        start = time.perf_counter()
        engine.generate(request, ResolvedModels(refs[path]))
        return time.perf_counter() - start, first_unet[0] - start

    cold()  # warm-up: imports, skeleton parsing caches
    for p in (path_a, path_b, path_a, path_b):
        job(p)
    misses = cache.stats().misses
    cold_times, same, switching, hits = [], [], [], []
    for _ in range(args.runs):
        cold_times.append(cold())
        job(path_a)
        same.append(job(path_a))
        switching.append(job(path_b))
        start = time.perf_counter()
        cache.get(path_b, refs[path_b].sha256)
        hits.append(time.perf_counter() - start)
    reloads = cache.stats().misses - misses

    cold_s = statistics.median(cold_times)
    same_job, switch_job = statistics.median(t for t, _ in same), statistics.median(t for t, _ in switching)
    same_setup, switch_setup = statistics.median(s for _, s in same), statistics.median(s for _, s in switching)
    extra = max(switch_setup - same_setup, 0.0)
    hit = statistics.median(hits)
    print(f"checkpoint switch — two tiny SD1.5 single files via PipelineCache, jobs {args.size}x{args.size}, "
          f"{args.steps} steps, median of {args.runs} interleaved runs")
    print(f"{'measure':<42}{'seconds':>10}{'vs cold load':>14}")
    print(f"{'cold load (cache miss)':<42}{cold_s:>10.4f}{1.0:>14.2%}")
    print(f"{'cache hit (get of a cached checkpoint)':<42}{hit:>10.6f}{hit / cold_s:>14.2%}")
    print(f"{'job, same checkpoint as last job':<42}{same_job:>10.4f}")
    print(f"{'job, checkpoint switched':<42}{switch_job:>10.4f}")
    print(f"{'set-up to first UNet call, same':<42}{same_setup:>10.4f}")
    print(f"{'set-up to first UNet call, switched':<42}{switch_setup:>10.4f}")
    print(f"{'switch overhead (set-up difference)':<42}{extra:>10.4f}{extra / cold_s:>14.2%}")
    print(f"reloads of cached checkpoints after warm-up: {reloads}")
    print(f"goal: switch <= 5% of a cold load -> {'met' if max(extra, hit) / cold_s <= 0.05 else 'NOT met'}")
    assert reloads == 0, f"cached checkpoints were reloaded {reloads} times"

if __name__ == "__main__":
    main()
