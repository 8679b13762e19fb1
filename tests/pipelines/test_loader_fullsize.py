"""The shipped SD1.5 skeleton, proven on a real-size checkpoint (random weights, 2 GB fp16, LDM layout).

Tiny models cannot show that the shipped configs fit real files; this does, on the CPU CI machine:
the file is written one tensor at a time, loaded through the product loader with the shipped
skeleton, and generates an image. Peak memory is sampled during the test.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines.loader import load_checkpoint  # noqa: E402
from pipelines.probe import Base, probe  # noqa: E402
from pipelines.skeletons import SHIPPED_ROOT  # noqa: E402
from tests.tiny.fixtures import write_random_ldm  # noqa: E402

torch.set_num_threads(2)
logger = logging.getLogger(__name__)


class PeakRss:
    """Samples this process's resident memory every 50 ms while active."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_fullsize_sd15_checkpoint_generates(tmp_path: Path, record_property):
    path = tmp_path / "sd15-random-fp16.safetensors"
    baseline = psutil.Process().memory_info().rss  # what earlier tests of this session left in the process
    with PeakRss() as rss:
        started = time.perf_counter()
        write_random_ldm(SHIPPED_ROOT / "sd15", path, dtype=torch.float16, seed=1)
        written = time.perf_counter()
        info = probe(path)
        assert info.base is Base.SD1 and info.details["tensors"] == 1130 and info.details["dtype"] == "F16"
        pipe = load_checkpoint(path, device="cpu", dtype=torch.float32)
        loaded = time.perf_counter()
        assert type(pipe).__name__ == "StableDiffusionPipeline"
        assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964
        assert len(pipe.tokenizer) == 49408
        pipe.set_progress_bar_config(disable=True)
        image = pipe("a photo of a cat, masterpiece", num_inference_steps=1, height=64, width=64,
                     guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0)).images
        generated = time.perf_counter()
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all() and image.std() > 0
    timings = {"write_s": written - started, "load_s": loaded - written, "generate_s": generated - loaded,
               "total_s": generated - started, "peak_rss_gib": rss.peak / 2**30,
               "baseline_rss_gib": baseline / 2**30, "load_rss_gib": (rss.peak - baseline) / 2**30,
               "file_gib": path.stat().st_size / 2**30}
    for key, value in timings.items():
        record_property(key, round(value, 2))
    logger.warning("full-size SD1.5: %s", ", ".join(f"{k}={v:.2f}" for k, v in timings.items()))
    # What writing, loading (fp32) and generating take on top of the process (6.3 GiB measured alone): within
    # 7 GiB. The whole process's peak also holds what earlier tests of the session left (0.5-1.7 GiB), which
    # says nothing about the loader, so it is recorded, not asserted.
    assert rss.peak - baseline < 7 * 2**30, f"peak RSS {rss.peak / 2**30:.2f} GiB over {baseline / 2**30:.2f}"
