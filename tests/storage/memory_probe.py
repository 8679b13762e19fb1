"""Measure the Python memory one streamed `put` costs, in a process of its own.

Run as ``python -m tests.storage.memory_probe STORE_URL SIZE [--with-hash]``; prints one JSON object.
A separate process matters: the test session's moto server keeps uploaded objects in *its* memory, in
the test process, and `tracemalloc` cannot tell those allocations from the store's. Here the only
thing running is the store, configured from the environment exactly as production would be.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import tracemalloc

from deploy.storage import open_store
from tests.storage.streams import GeneratedStream, generated_sha256

KEY = "probe/stream.bin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("size", type=int)
    parser.add_argument("--with-hash", action="store_true", help="pass expected_sha256 to put")
    args = parser.parse_args()

    expected = generated_sha256(args.size)
    store = open_store(args.url)
    # Load client models, endpoint rules and the like before measuring: they are paid once per process.
    store.put("probe/warm-up", io.BytesIO(b"warm up"))
    gc.collect()

    tracemalloc.start()
    baseline, _ = tracemalloc.get_traced_memory()
    blob = store.put(KEY, GeneratedStream(args.size), expected_sha256=expected if args.with_hash else None)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    digest = hashlib.sha256()
    with store.open(KEY) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    stat = store.stat(KEY)
    print(
        json.dumps(
            {
                "peak_growth": peak - baseline,
                "size": blob.size,
                "sha256": blob.sha256,
                "stat_sha256": stat.sha256 if stat else None,
                "read_back_sha256": digest.hexdigest(),
                "expected_sha256": expected,
            }
        )
    )


if __name__ == "__main__":
    main()
