"""Datasets on S3 (moto): the kohya layout under the prefix and an s3:// location to copy; and zips whose
headers lie about their sizes (a bomb disguised as a small entry) refused with nothing stored."""

from __future__ import annotations

import struct

import pytest

from tests.datasets.conftest import make_user, make_zip, png, row_count, stored
from tests.fixtures.moto_server import moto_server, s3_bucket, s3_client  # noqa: F401
from webapp.services.errors import InvalidInput


def test_an_s3_store_keeps_the_layout_and_shows_an_s3_uri(make_settings, s3_bucket, s3_client):  # noqa: F811
    import app

    studio = app.build(make_settings(store=f"s3://{s3_bucket}/studio"))
    try:
        alice = make_user(studio)
        dataset = studio.datasets.create(actor=alice, name="cloud", repeats=7,
                                         files=[("a.png", png()), ("a.txt", b"in the cloud")]).dataset
        assert studio.datasets.location(dataset, actor=studio.users.get_by_name("admin")) == f"s3://{s3_bucket}/studio/datasets/{dataset.id}/"
        keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"])
        assert keys == [f"studio/datasets/{dataset.id}/7_cloud/a.png", f"studio/datasets/{dataset.id}/7_cloud/a.txt"]
        studio.datasets.delete(actor=alice, dataset_id=dataset.id)
        assert "Contents" not in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="studio/datasets/")
    finally:
        studio.close()


def _forge_sizes(data: bytes, declared: int) -> bytes:
    """Rewrite every uncompressed-size field (local header offset 22, central directory offset 24)."""
    out = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = out.find(signature)
        while start != -1:
            struct.pack_into("<I", out, start + offset, declared)
            start = out.find(signature, start + 4)
    return bytes(out)


def test_an_entry_larger_than_its_header_declares_is_refused(dstudio):
    import io

    alice = make_user(dstudio)
    real = make_zip({"1_a/big.png": png() + b"\0" * (3 * 2**20)}).getvalue()  # 3 MB inflated, over the 1 MB limit
    forged = _forge_sizes(real, 100)  # the directory now claims 100 bytes
    with pytest.raises(InvalidInput, match="'1_a/big.png' cannot be read from the zip") as info:
        dstudio.datasets.create_from_zip(actor=alice, name="liar", zip_file=io.BytesIO(forged))
    assert info.value.field == "zip"
    assert stored(dstudio) == [] and row_count(dstudio) == (0, 0)
