"""Fixtures for the asset-store suite: each contract test runs against local, memory and S3-on-moto.

`store_case` pairs a store with a `residue()` probe (see `cases`), so "nothing left behind" is
asserted the same way for every backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.storage import BlobStore, LocalStore, MemoryStore, open_store
from tests.fixtures.moto_server import moto_server, s3_bucket, s3_client  # noqa: F401
from tests.storage.cases import StoreCase, local_residue, s3_residue

STORE_KINDS = ["local", "memory", "s3"]


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def s3_store(s3_bucket: str) -> Iterator[BlobStore]:  # noqa: F811
    """An S3 store built only from the environment the moto fixture set, as production builds it."""
    with open_store(f"s3://{s3_bucket}/assets") as store:
        yield store


@pytest.fixture(params=STORE_KINDS)
def store_case(request: pytest.FixtureRequest, tmp_path: Path) -> StoreCase:
    kind = request.param
    if kind == "local":
        store = LocalStore(tmp_path / "store")
        return StoreCase(kind, store, lambda: local_residue(store.root))
    if kind == "memory":
        memory = MemoryStore()
        return StoreCase(kind, memory, lambda: [blob.key for blob in memory.list()])
    bucket = request.getfixturevalue("s3_bucket")
    client = request.getfixturevalue("s3_client")
    s3 = request.getfixturevalue("s3_store")
    return StoreCase(kind, s3, lambda: s3_residue(client, bucket, s3.prefix))


@pytest.fixture
def store(store_case: StoreCase) -> BlobStore:
    return store_case.store
