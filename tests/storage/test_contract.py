"""The `BlobStore` contract, asserted identically on local disk, memory and S3 (moto)."""

from __future__ import annotations

import hashlib
import io
from datetime import datetime
from pathlib import Path

import pytest

from deploy.storage import BlobNotFound, BlobStore, ChecksumMismatch, InvalidKey, StoredBlob
from tests.storage.cases import StoreCase
from tests.storage.streams import GeneratedStream, SourceFailure, generated_bytes, generated_sha256

# Larger than one 8 MiB S3 part, so S3 failures happen inside a multipart upload.
MULTIPART_SIZE = 9 * 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(store: BlobStore, key: str) -> bytes:
    with store.open(key) as stream:
        return stream.read()


def test_put_then_read_back(store: BlobStore) -> None:
    data = b"checkpoint bytes " * 1000

    blob = store.put("models/ckpt/a.safetensors", io.BytesIO(data), content_type="application/octet-stream")

    assert isinstance(blob, StoredBlob)
    assert (blob.key, blob.size, blob.sha256) == ("models/ckpt/a.safetensors", len(data), sha(data))
    assert isinstance(blob.modified, datetime) and blob.modified.tzinfo is not None
    assert read_all(store, "models/ckpt/a.safetensors") == data
    assert store.exists("models/ckpt/a.safetensors")
    stat = store.stat("models/ckpt/a.safetensors")
    assert stat is not None
    assert (stat.size, stat.sha256, stat.content_type) == (len(data), sha(data), "application/octet-stream")


def test_open_streams_in_chunks(store: BlobStore) -> None:
    data = generated_bytes(300_000)
    store.put("big.bin", io.BytesIO(data))

    with store.open("big.bin") as stream:
        pieces = []
        while piece := stream.read(65_536):
            assert len(piece) <= 65_536
            pieces.append(piece)

    assert len(pieces) >= 5
    assert b"".join(pieces) == data


def test_empty_blob(store: BlobStore) -> None:
    blob = store.put("empty", io.BytesIO(b""))

    assert (blob.size, blob.sha256) == (0, sha(b""))
    assert read_all(store, "empty") == b""


def test_put_replaces_previous_blob(store: BlobStore) -> None:
    store.put("k", io.BytesIO(b"first version"))
    blob = store.put("k", io.BytesIO(b"second"))

    assert read_all(store, "k") == b"second"
    stat = store.stat("k")
    assert stat == StoredBlob("k", 6, sha(b"second"), stat.modified, "application/octet-stream")
    assert blob.sha256 == sha(b"second")


def test_put_file_and_download_to(store: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "upload.bin"
    source.write_bytes(generated_bytes(200_000, seed=3))
    store.put_file("loras/style.safetensors", source)
    target = tmp_path / "out" / "nested" / "style.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"stale copy")

    blob = store.download_to("loras/style.safetensors", target)

    assert target.read_bytes() == source.read_bytes()
    assert blob.sha256 == sha(source.read_bytes())
    assert sorted(p.name for p in target.parent.iterdir()) == ["style.safetensors"]


def test_missing_blob(store: BlobStore, tmp_path: Path) -> None:
    assert store.stat("nope") is None
    assert not store.exists("nope")
    with pytest.raises(BlobNotFound, match="'nope'") as raised:
        store.open("nope")
    assert isinstance(raised.value, KeyError)
    with pytest.raises(BlobNotFound):
        store.download_to("nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_delete_is_idempotent(store_case: StoreCase) -> None:
    store = store_case.store
    store.put("a/b", io.BytesIO(b"x"))
    store.put("a/c", io.BytesIO(b"y"))

    store.delete("a/b")
    store.delete("a/b")
    store.delete("never/existed")

    assert not store.exists("a/b")
    assert read_all(store, "a/c") == b"y"
    assert store_case.residue() == ["a/c"]


def test_list_by_prefix_in_key_order(store: BlobStore) -> None:
    for key in ["models/b.ckpt", "models/a.ckpt", "models-old/x", "images/1.png", "models/sub/c.pt"]:
        store.put(key, io.BytesIO(key.encode()))

    assert [b.key for b in store.list()] == [
        "images/1.png",
        "models-old/x",
        "models/a.ckpt",
        "models/b.ckpt",
        "models/sub/c.pt",
    ]
    assert [b.key for b in store.list("models/")] == ["models/a.ckpt", "models/b.ckpt", "models/sub/c.pt"]
    assert [b.key for b in store.list("models")] == [
        "models-old/x",
        "models/a.ckpt",
        "models/b.ckpt",
        "models/sub/c.pt",
    ]
    assert [b.key for b in store.list("models/s")] == ["models/sub/c.pt"]
    assert list(store.list("nothing/")) == []
    listed = {b.key: b for b in store.list("images/")}
    assert listed["images/1.png"].size == len(b"images/1.png")
    assert listed["images/1.png"].sha256 in (None, sha(b"images/1.png"))


def test_expected_sha256_accepted(store: BlobStore) -> None:
    data = b"verified"
    blob = store.put("v", io.BytesIO(data), expected_sha256=sha(data).upper())

    assert blob.sha256 == sha(data)
    assert store.stat("v").sha256 == sha(data)


@pytest.mark.parametrize("size", [100, MULTIPART_SIZE])
def test_expected_sha256_mismatch_stores_nothing(store_case: StoreCase, size: int) -> None:
    store = store_case.store
    store.put("keep", io.BytesIO(b"existing"))
    wrong = "0" * 64

    with pytest.raises(ChecksumMismatch) as raised:
        store.put("keep", GeneratedStream(size), expected_sha256=wrong)
    with pytest.raises(ChecksumMismatch):
        store.put("new/blob", GeneratedStream(size), expected_sha256=wrong)

    message = str(raised.value)
    assert wrong in message and generated_sha256(size) in message and "'keep'" in message
    assert isinstance(raised.value, ValueError)
    assert read_all(store, "keep") == b"existing"
    assert not store.exists("new/blob")
    assert store_case.residue() == ["keep"]


def test_expected_sha256_must_be_a_sha256(store: BlobStore) -> None:
    with pytest.raises(ValueError, match="expected_sha256 must be 64 hex"):
        store.put("k", io.BytesIO(b"x"), expected_sha256="abc")
    assert not store.exists("k")


@pytest.mark.parametrize("with_expected_hash", [False, True], ids=["no-hash", "expected-hash"])
def test_failing_source_leaves_nothing(store_case: StoreCase, with_expected_hash: bool) -> None:
    store = store_case.store
    store.put("models/m.bin", io.BytesIO(b"old model"))
    expected = generated_sha256(MULTIPART_SIZE + 1024) if with_expected_hash else None
    failing = GeneratedStream(MULTIPART_SIZE + 1024, fail_after=MULTIPART_SIZE)

    with pytest.raises(SourceFailure):
        store.put("models/m.bin", failing, expected_sha256=expected)
    with pytest.raises(SourceFailure):
        store.put(
            "models/other.bin",
            GeneratedStream(MULTIPART_SIZE + 1024, fail_after=MULTIPART_SIZE),
            expected_sha256=expected,
        )

    assert read_all(store, "models/m.bin") == b"old model"
    assert not store.exists("models/other.bin")
    assert store_case.residue() == ["models/m.bin"]


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a/./b",
        ".",
        "a//b",
        "a/",
        "a\\b",
        "..\\x",
        "a\x00b",
        "a\nb",
        ".studio-meta/x",
        "x" * 241,
    ],
)
def test_bad_keys_rejected(store_case: StoreCase, key: str, tmp_path: Path) -> None:
    store = store_case.store
    calls = [
        lambda: store.put(key, io.BytesIO(b"x")),
        lambda: store.open(key),
        lambda: store.stat(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.url(key),
        lambda: store.download_to(key, tmp_path / "out"),
    ]
    for call in calls:
        with pytest.raises(InvalidKey) as raised:
            call()
        assert isinstance(raised.value, ValueError)
        assert repr(key)[:30] in str(raised.value)
    assert store_case.residue() == []
    assert not (tmp_path / "out").exists()


def test_bad_list_prefix_rejected(store: BlobStore) -> None:
    for prefix in ["../", "/abs", "a//"]:
        with pytest.raises(InvalidKey):
            list(store.list(prefix))


def test_non_binary_source_rejected(store_case: StoreCase) -> None:
    with pytest.raises(TypeError, match="io.BytesIO"):
        store_case.store.put("k", b"raw bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="binary mode"):
        store_case.store.put("k", io.StringIO("text"))
    assert store_case.residue() == []


def test_url(store_case: StoreCase) -> None:
    store = store_case.store
    store.put("img/1.png", io.BytesIO(b"png"))

    url = store.url("img/1.png", expires=60)

    if store_case.kind == "s3":
        assert url is not None and url.startswith("http://127.0.0.1:")
    else:
        assert url is None
