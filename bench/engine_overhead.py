"""Throughput of ``Engine.generate`` against a bare diffusers pipeline call, same model and parameters.

    python bench/engine_overhead.py [--runs 7] [--size 256] [--steps 20]

Both sides use the same tiny SD1.5 pipeline (built in code), the same sampler (Euler), seed, size and
step count. The bare side is ``pipe(prompt, ...)`` returning PIL images; the engine side returns PNG
bytes with the infotext embedded, so a second baseline adds the PNG encoding a bare caller would also
need. Runs are interleaved; medians and best runs are reported (on a shared machine the best run is
the least disturbed estimate). Goal: engine ≥ 0.97× the bare throughput.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipelines.engine import Engine  # noqa: E402
from pipelines.types import GenerationRequest, ModelRef, ResolvedModels  # noqa: E402
from tests.tiny.models import tiny_sd15  # noqa: E402

PROMPT = "a photo of a cat, masterpiece, (red house:1.2)"


class _Provider:
    def __init__(self, pipe) -> None:
        self.pipe = pipe

    def get(self, path, sha256=None):
        return self.pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 avoids OpenMP spin-waits distorting ratios on a shared machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # LoRA loading into CLIP prints a harmless "MISSING" load report

    with tempfile.TemporaryDirectory() as tmp:
        pipe = tiny_sd15(Path(tmp) / "tok")
        from diffusers import EulerDiscreteScheduler

        bare_scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        engine = Engine(_Provider(pipe))
        models = ResolvedModels(ModelRef("tiny.safetensors", Path(tmp) / "tiny.safetensors", "0" * 64, "checkpoint"))
        request = GenerationRequest(prompt=PROMPT, negative_prompt="ugly", steps=args.steps, width=args.size,
                                    height=args.size, seed=1, sampler_name="Euler", cfg_scale=7.0,
                                    batch_size=args.batch)

        def bare(encode: bool) -> float:
            pipe.scheduler = bare_scheduler
            start = time.perf_counter()
            images = pipe(PROMPT, negative_prompt="ugly", num_inference_steps=args.steps, height=args.size,
                          width=args.size, guidance_scale=7.0, num_images_per_prompt=args.batch,
                          generator=torch.Generator().manual_seed(1)).images
            if encode:
                for image in images:
                    image.save(io.BytesIO(), format="PNG")
            return time.perf_counter() - start

        def ours() -> float:
            start = time.perf_counter()
            engine.generate(request, models)
            return time.perf_counter() - start

        bare(False), bare(True), ours()  # warm-up: lazy imports, derived pipelines, allocator
        times: dict[str, list[float]] = {"bare": [], "bare+png": [], "engine": []}
        for _ in range(args.runs):
            times["bare"].append(bare(False))
            times["bare+png"].append(bare(True))
            times["engine"].append(ours())

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"engine overhead — tiny SD1.5, {args.size}x{args.size}, {args.steps} steps, batch {args.batch}, "
          f"Euler, CFG 7, median of {args.runs} interleaved runs, {torch.get_num_threads()} threads")
    print(f"{'variant':<12}{'median s':>10}{'min s':>10}{'images/s':>10}{'ratio':>8}")
    for name in ("bare", "bare+png", "engine"):
        ratio = med["bare"] / med[name]
        print(f"{name:<12}{med[name]:>10.4f}{min(times[name]):>10.4f}{args.batch / med[name]:>10.3f}{ratio:>8.3f}")
    best = {k: min(v) for k, v in times.items()}
    print(f"engine throughput (medians) = {med['bare'] / med['engine']:.3f}x bare call, "
          f"{med['bare+png'] / med['engine']:.3f}x bare call + PNG encode")
    print(f"engine throughput (best runs, least disturbed by other load) = {best['bare'] / best['engine']:.3f}x bare "
          f"call, {best['bare+png'] / best['engine']:.3f}x bare call + PNG encode (goal >= 0.97)")


if __name__ == "__main__":
    main()
