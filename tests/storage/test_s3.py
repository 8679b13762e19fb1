"""S3-specific behaviour on moto: layout under the prefix, metadata, multipart abort, presigned URLs,
configuration through the environment or explicit options."""

from __future__ import annotations

import hashlib
import io
import urllib.request
from collections import Counter
from typing import Any

import pytest

from deploy.storage import BlobNotFound, ChecksumMismatch, StorageError, open_store
from deploy.storage.s3 import DEFAULT_PART_SIZE, S3Store
from tests.fixtures.moto_server import moto_client
from tests.storage.cases import s3_residue
from tests.storage.streams import GeneratedStream, ShiftingFile, SourceFailure, generated_sha256

SIZE = DEFAULT_PART_SIZE * 2 + 12345


def counting_client(endpoint: str) -> tuple[Any, Counter[str]]:
    """A client that counts the S3 operations it sends, to prove which upload path ran."""
    client = moto_client("s3", endpoint)
    calls: Counter[str] = Counter()
    client.meta.events.register("before-call.s3.*", lambda model, **_: calls.update([model.name]))
    return client, calls


def test_objects_live_under_the_prefix_with_sha256_metadata(s3_bucket: str, s3_client: Any) -> None:
    store = open_store(f"s3://{s3_bucket}/studio/assets/")
    s3_client.put_object(Bucket=s3_bucket, Key="outside/x", Body=b"not ours")

    store.put("models/a.bin", io.BytesIO(b"abc"), content_type="image/png")

    head = s3_client.head_object(Bucket=s3_bucket, Key="studio/assets/models/a.bin")
    assert head["Metadata"]["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert head["ContentType"] == "image/png"
    assert [b.key for b in store.list()] == ["models/a.bin"]
    assert store.stat("models/a.bin").sha256 == hashlib.sha256(b"abc").hexdigest()


def test_large_stream_uses_multipart_and_round_trips(moto_server: str, s3_bucket: str) -> None:
    client, calls = counting_client(moto_server)
    store = S3Store(s3_bucket, "p", client=client)
    expected = generated_sha256(SIZE)

    blob = store.put("big.bin", GeneratedStream(SIZE), expected_sha256=expected)

    assert (blob.size, blob.sha256) == (SIZE, expected)
    assert calls["CreateMultipartUpload"] == 1 and calls["UploadPart"] == 3
    assert calls["CompleteMultipartUpload"] == 1 and calls["PutObject"] == 0
    digest = hashlib.sha256()
    with store.open("big.bin") as body:
        while chunk := body.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == expected
    assert store.stat("big.bin").sha256 == expected


def test_failure_after_uploaded_parts_aborts_the_upload(
    moto_server: str, s3_bucket: str, s3_client: Any
) -> None:
    client, calls = counting_client(moto_server)
    store = S3Store(s3_bucket, "p", client=client)
    failing = GeneratedStream(SIZE, fail_after=DEFAULT_PART_SIZE * 2 + 10)

    with pytest.raises(SourceFailure):
        store.put("big.bin", failing, expected_sha256=generated_sha256(SIZE))

    assert calls["UploadPart"] == 2 and calls["AbortMultipartUpload"] == 1
    assert calls["CompleteMultipartUpload"] == 0
    assert s3_residue(s3_client, s3_bucket, "p") == []


def test_hash_mismatch_after_uploaded_parts_aborts(moto_server: str, s3_bucket: str, s3_client: Any) -> None:
    client, calls = counting_client(moto_server)
    store = S3Store(s3_bucket, client=client)

    with pytest.raises(ChecksumMismatch, match="nothing was stored"):
        store.put("big.bin", GeneratedStream(SIZE), expected_sha256="f" * 64)

    assert calls["UploadPart"] == 3 and calls["AbortMultipartUpload"] == 1
    assert s3_residue(s3_client, s3_bucket, "") == []


def test_pipe_without_hash_is_spooled_then_uploaded(moto_server: str, s3_bucket: str, tmp_path: Any) -> None:
    client, calls = counting_client(moto_server)
    spool = tmp_path / "spool"
    spool.mkdir()
    store = S3Store(s3_bucket, client=client, spool_dir=spool)

    blob = store.put("piped.bin", GeneratedStream(SIZE, seed=7))

    assert blob.sha256 == generated_sha256(SIZE, seed=7)
    assert store.stat("piped.bin").sha256 == blob.sha256
    assert calls["UploadPart"] == 3
    assert list(spool.iterdir()) == []


def test_source_changing_during_upload_is_refused(s3_bucket: str, s3_client: Any) -> None:
    store = open_store(f"s3://{s3_bucket}")
    source = ShiftingFile(b"A" * 1000, b"B" * 1000)

    with pytest.raises(ChecksumMismatch) as raised:
        store.put("shifty", source)

    assert raised.value.expected == hashlib.sha256(b"A" * 1000).hexdigest()
    assert raised.value.actual == hashlib.sha256(b"B" * 1000).hexdigest()
    assert s3_residue(s3_client, s3_bucket, "") == []


def test_seekable_source_uploads_from_its_current_position(s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}")
    source = io.BytesIO(b"header|payload")
    source.seek(7)

    blob = store.put("tail", source)

    assert blob.sha256 == hashlib.sha256(b"payload").hexdigest()
    with store.open("tail") as body:
        assert body.read() == b"payload"


def test_presigned_url_is_fetchable_over_plain_http(s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/assets")
    store.put("images/cat.png", io.BytesIO(b"\x89PNG fake"), content_type="image/png")

    url = store.url("images/cat.png", expires=120)

    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"\x89PNG fake"
        assert response.headers["Content-Type"] == "image/png"
    assert "X-Amz-Expires=120" in url
    for bad in (0, 7 * 24 * 3600 + 1, 1.5):
        with pytest.raises(ValueError, match="expires"):
            store.url("images/cat.png", expires=bad)  # type: ignore[arg-type]


def test_listing_follows_pagination(moto_server: str, s3_bucket: str) -> None:
    client, calls = counting_client(moto_server)
    store = S3Store(s3_bucket, "p", client=client, list_page_size=2)
    keys = [f"k/{i:02d}" for i in range(7)]
    for key in keys:
        store.put(key, io.BytesIO(key.encode()))
    calls.clear()

    assert [b.key for b in store.list("k/")] == keys
    assert calls["ListObjectsV2"] == 4


def test_foreign_objects_with_unusable_keys_are_skipped(s3_bucket: str, s3_client: Any) -> None:
    store = open_store(f"s3://{s3_bucket}/p")
    s3_client.put_object(Bucket=s3_bucket, Key="p/folder/", Body=b"")
    s3_client.put_object(Bucket=s3_bucket, Key="p/a//b", Body=b"")
    store.put("good", io.BytesIO(b"1"))

    assert [b.key for b in store.list()] == ["good"]


def test_corrupt_object_is_not_downloaded(s3_bucket: str, s3_client: Any, tmp_path: Any) -> None:
    store = open_store(f"s3://{s3_bucket}")
    s3_client.put_object(Bucket=s3_bucket, Key="m.bin", Body=b"tampered", Metadata={"sha256": "a" * 64})
    target = tmp_path / "m.bin"

    with pytest.raises(ChecksumMismatch, match="left untouched"):
        store.download_to("m.bin", target)

    assert list(tmp_path.iterdir()) == []


def test_missing_bucket_is_named(moto_server: str) -> None:
    store = open_store("s3://no-such-bucket-here/x")

    with pytest.raises(StorageError, match="no-such-bucket-here"):
        store.put("k", io.BytesIO(b"x"))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist") as raised:
        store.open("k")
    assert not isinstance(raised.value, BlobNotFound)


def test_explicit_endpoint_without_environment(
    moto_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    store = open_store(f"s3://{s3_bucket}/x", endpoint_url=moto_server, region="us-east-1")

    store.put("k", io.BytesIO(b"via option"))

    with store.open("k") as body:
        assert body.read() == b"via option"
    assert store.url("k").startswith(moto_server)


def test_s3_options_are_validated() -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3Store("bucket", client=object(), part_size=1024)
    with pytest.raises(ValueError, match="bucket"):
        S3Store("", client=object())
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        open_store("s3:///prefix-only")
