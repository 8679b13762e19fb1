"""What building a studio costs in-process: ``app.build`` alone (the APIs answer; the page waits for its first
visit) against ``app.build`` plus the Gradio page (what ``python app.py`` does before serving), median of N, on a
fresh data dir each time; and one argon2id hash at the default cost against OWASP's 19 MiB × 2 pair.

    python bench/studio_build.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _build(with_page: bool) -> float:
    import app
    from webapp.settings import Settings

    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="bench-build-")) / "data",
                        admin_password="bench-password-123")
    start = time.perf_counter()
    studio = app.build(settings)
    if with_page:
        studio.ui.ready()
    took = time.perf_counter() - start
    studio.close()
    return took


def _hash(**cost: int) -> float:
    from argon2 import PasswordHasher

    hasher = PasswordHasher(**cost)
    start = time.perf_counter()
    for _ in range(5):
        hasher.hash("bench-password-123")
    return (time.perf_counter() - start) / 5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    _build(True)  # imports and first-use caches out of the way
    page = statistics.median(_build(True) for _ in range(runs))
    api = statistics.median(_build(False) for _ in range(runs))
    print(f"app.build + page (python app.py): {page * 1000:7.0f} ms  x1.00")
    print(f"app.build, page on first visit:   {api * 1000:7.0f} ms  x{api / page:.2f}")
    default = _hash()
    owasp = _hash(memory_cost=19456, time_cost=2, parallelism=1)
    print(f"argon2id hash, default cost:      {default * 1000:7.1f} ms  x1.00")
    print(f"argon2id hash, 19 MiB x 2 x 1:    {owasp * 1000:7.1f} ms  x{owasp / default:.2f}")


if __name__ == "__main__":
    main()
