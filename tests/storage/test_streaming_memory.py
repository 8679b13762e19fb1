"""A 50 MB upload from a generator-backed stream must cost a bounded amount of memory, not the file.

The measurement runs in a child process (see `memory_probe`); the memory store, which by design keeps
every byte, is the control that proves the probe would notice a store holding the whole file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.storage.streams import generated_sha256

SIZE = 50 * 1024 * 1024
PEAK_LIMIT = 16 * 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parents[2]


def probe(url: str, *, with_hash: bool) -> dict[str, object]:
    command = [sys.executable, "-m", "tests.storage.memory_probe", url, str(SIZE)]
    if with_hash:
        command.append("--with-hash")
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def expected_sha256() -> str:
    return generated_sha256(SIZE)


@pytest.mark.parametrize(
    ("kind", "with_hash"),
    [("local", False), ("s3", True), ("s3", False)],
    ids=["local", "s3-streamed", "s3-spooled"],
)
def test_50mb_put_is_streamed(
    kind: str, with_hash: bool, expected_sha256: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "local":
        url = str(tmp_path / "store")
    else:
        url = f"s3://{request.getfixturevalue('s3_bucket')}/memory"

    result = probe(url, with_hash=with_hash)

    assert result["size"] == SIZE
    assert result["sha256"] == result["stat_sha256"] == result["read_back_sha256"] == expected_sha256
    assert result["expected_sha256"] == expected_sha256
    assert result["peak_growth"] < PEAK_LIMIT, f"peak {result['peak_growth'] / 2**20:.1f} MiB"


def test_probe_sees_a_store_that_holds_the_file(expected_sha256: str) -> None:
    result = probe("memory://", with_hash=False)

    assert result["read_back_sha256"] == expected_sha256
    assert result["peak_growth"] > SIZE
