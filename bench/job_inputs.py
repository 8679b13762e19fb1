"""What an img2img job costs the database row and the dispatcher, with inputs inline vs in the asset store.

    python bench/job_inputs.py [--size 512] [--runs 20]

Before inputs moved to the asset store, the row held the request as sent (init image and mask as base64)
and the dispatcher parsed and validated it again to build the JobSpec (base64 decoded, images opened). Now
the row holds the request with references plus the validated engine form, the images are blobs, and the
dispatcher reads the blobs back without validating. Both are measured here on the same request, in the
same run: row bytes (the ratio is what one queued job costs SQLite) and dispatch time (median of
``--runs``; ratio = inline time / store time). Three images per size: a smooth gradient (compresses well,
flat renders), a photo-like one (a gradient with sensor-like noise: about what a 512x512 photo or render
weighs as PNG) and uniform noise (the worst case for PNG).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


KINDS = {"gradient": 0.0, "photo-like": 6.0, "noise": None}
"""Image kind -> the noise (standard deviation) added to a gradient; None: uniform noise."""


def _png(size: int, kind: str) -> bytes:
    import numpy as np
    from PIL import Image

    rng, sigma = np.random.default_rng(0), KINDS[kind]
    if sigma is None:
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    else:
        ramp = np.linspace(0, 255, size)
        smooth = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)),
                           np.full((size, size), 128.0)], axis=-1)
        pixels = np.clip(smooth + rng.normal(0, sigma, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _median_ms(action, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(size: int, kind: str, runs: int) -> dict[str, float]:
    from deploy.storage.memory import MemoryStore
    from webapp.records import Job, JobMode
    from webapp.services.jobs.inputs import JobInputs
    from webapp.services.jobs.requests import engine_request

    image = _png(size, kind)
    request = {"prompt": "a red fox", "steps": 20, "width": size, "height": size, "seed": 7, "sampler_name": "Euler",
               "denoising_strength": 0.5, "init_images": [base64.b64encode(image).decode()]}
    engine = engine_request(JobMode.IMG2IMG, request)
    inputs = JobInputs(MemoryStore())
    job = Job(owner_id=1, owner_name="bench", mode=JobMode.IMG2IMG, endpoint="local", request_json="")
    staged = inputs.stage(job_id=job.id, request=request, engine=engine, units={})
    inputs.write(staged)
    job.request_json, job.engine_request_json = staged.request_json, staged.engine_request_json
    inline_json = json.dumps(request)
    inline_ms = _median_ms(lambda: engine_request(JobMode.IMG2IMG, json.loads(inline_json)), runs)
    store_ms = _median_ms(lambda: inputs.load(job), runs)
    return {"png": len(image), "inline_row": len(inline_json.encode()),
            "store_row": len(staged.request_json.encode()) + len(staged.engine_request_json.encode()),
            "inline_ms": inline_ms, "store_ms": store_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    print(f"img2img {args.size}x{args.size}, one init image; dispatch = median of {args.runs}")
    print(f"{'image':<11}{'PNG bytes':>11}{'row inline':>12}{'row store':>11}{'row ratio':>11}"
          f"{'dispatch inline':>17}{'dispatch store':>16}{'speed-up':>10}")
    for kind in KINDS:
        r = measure(args.size, kind, args.runs)
        print(f"{kind:<11}{r['png']:>11,}{r['inline_row']:>12,}{r['store_row']:>11,}"
              f"{r['inline_row'] / r['store_row']:>10.0f}x{r['inline_ms']:>15.2f}ms{r['store_ms']:>14.2f}ms"
              f"{r['inline_ms'] / r['store_ms']:>9.1f}x")


if __name__ == "__main__":
    main()
