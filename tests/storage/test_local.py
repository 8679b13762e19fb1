"""LocalStore specifics: it never leaves its root, keeps honest metadata, and `open_store` picks stores
by URL."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

import deploy.storage as storage
from deploy.storage import (
    BlobNotFound,
    ChecksumMismatch,
    InvalidKey,
    LocalStore,
    MemoryStore,
    StorageError,
    UnknownScheme,
    open_store,
    register_store,
)
from deploy.storage.s3 import S3Store


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret.txt").write_bytes(b"do not leak")
    return directory


def test_files_are_plain_files_under_the_root(local_store: LocalStore) -> None:
    local_store.put("models/lora/x.safetensors", io.BytesIO(b"weights"))

    assert (local_store.root / "models" / "lora" / "x.safetensors").read_bytes() == b"weights"
    assert oct((local_store.root / "models" / "lora" / "x.safetensors").stat().st_mode & 0o777) == "0o600"


def test_symlinked_directory_leading_outside_is_refused(local_store: LocalStore, outside: Path) -> None:
    (local_store.root / "escape").symlink_to(outside, target_is_directory=True)

    for call in (
        lambda: local_store.put("escape/new.txt", io.BytesIO(b"x")),
        lambda: local_store.open("escape/secret.txt"),
        lambda: local_store.stat("escape/secret.txt"),
        lambda: local_store.delete("escape/secret.txt"),
        lambda: list(local_store.list("escape/")),
    ):
        with pytest.raises(InvalidKey, match="outside the store root"):
            call()

    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (outside / "secret.txt").read_bytes() == b"do not leak"
    assert list(local_store.list()) == []


def test_symlinked_file_leading_outside_is_refused_and_not_listed(
    local_store: LocalStore, outside: Path
) -> None:
    (local_store.root / "leak.txt").symlink_to(outside / "secret.txt")
    (local_store.root / "dangling").symlink_to(outside / "not-yet")
    local_store.put("ok.txt", io.BytesIO(b"fine"))

    with pytest.raises(InvalidKey, match="outside the store root"):
        local_store.open("leak.txt")
    with pytest.raises(InvalidKey, match="outside the store root"):
        local_store.put("dangling", io.BytesIO(b"would be written outside"))

    assert [b.key for b in local_store.list()] == ["ok.txt"]
    assert not (outside / "not-yet").exists()


def test_symlink_within_the_root_is_followed(local_store: LocalStore) -> None:
    local_store.put("real/a.txt", io.BytesIO(b"inside"))
    (local_store.root / "alias").symlink_to(local_store.root / "real", target_is_directory=True)

    with local_store.open("alias/a.txt") as stream:
        assert stream.read() == b"inside"


def test_hash_is_unknown_once_the_file_changes_behind_the_store(local_store: LocalStore) -> None:
    local_store.put("m.bin", io.BytesIO(b"original"), content_type="application/x-safetensors")
    assert local_store.stat("m.bin").sha256 == hashlib.sha256(b"original").hexdigest()

    (local_store.root / "m.bin").write_bytes(b"edited by hand, longer")

    stat = local_store.stat("m.bin")
    assert (stat.size, stat.sha256, stat.content_type) == (22, None, "application/x-safetensors")


def test_corruption_that_keeps_size_and_mtime_is_caught_on_download(
    local_store: LocalStore, tmp_path: Path
) -> None:
    local_store.put("m.bin", io.BytesIO(b"original"))
    path = local_store.root / "m.bin"
    before = path.stat()
    path.write_bytes(b"bitflip!")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    target = tmp_path / "copy.bin"
    target.write_bytes(b"previous good copy")

    with pytest.raises(ChecksumMismatch, match="left untouched"):
        local_store.download_to("m.bin", target)

    assert target.read_bytes() == b"previous good copy"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["copy.bin"]


def test_blob_and_directory_name_clash_is_a_clear_error(local_store: LocalStore) -> None:
    local_store.put("a", io.BytesIO(b"blob"))
    local_store.put("d/x", io.BytesIO(b"blob"))

    with pytest.raises(StorageError, match="'a/b'"):
        local_store.put("a/b", io.BytesIO(b"x"))
    with pytest.raises(StorageError, match="directory"):
        local_store.put("d", io.BytesIO(b"x"))
    with pytest.raises(StorageError, match="directory"):
        local_store.delete("d")

    assert [b.key for b in local_store.list()] == ["a", "d/x"]
    assert local_store.stat("d") is None
    assert local_store.stat("a/b") is None
    with pytest.raises(BlobNotFound):
        local_store.open("a/b")
    with pytest.raises(BlobNotFound):
        local_store.open("d")


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="not a directory"):
        LocalStore(tmp_path / "file")
    with pytest.raises(StorageError, match="not a directory"):
        LocalStore(tmp_path / "missing", create=False)


# -- open_store --------------------------------------------------------------------------------------


def test_open_store_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    assert open_store(f"file://{tmp_path}/a").root == tmp_path / "a"
    assert open_store(f"file://localhost{tmp_path}/b%20c").root == tmp_path / "b c"
    assert open_store(str(tmp_path / "d")).root == tmp_path / "d"
    assert open_store("relative/e").root == tmp_path / "relative" / "e"
    assert open_store(tmp_path / "f").root == tmp_path / "f"
    (tmp_path / "g").mkdir()
    assert open_store(str(tmp_path / "g"), create=False).root == tmp_path / "g"


def test_open_store_other_schemes() -> None:
    memory = open_store("memory://")
    assert isinstance(memory, MemoryStore) and memory is not open_store("memory://")

    s3 = open_store("s3://bucket/some/prefix/", region="us-east-1")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    s3.close()


@pytest.mark.parametrize(
    ("url", "error", "message"),
    [
        ("", ValueError, "must not be empty"),
        ("ftp://host/x", UnknownScheme, "known: file://, memory://, s3://"),
        ("file://otherhost/x", ValueError, "local absolute path"),
        ("memory://named", ValueError, "just 'memory://'"),
        ("s3://bucket/p?region=x", ValueError, "not in the URL"),
        ("s3://bucket/../up", InvalidKey, "'../up'"),
    ],
)
def test_open_store_rejects_bad_urls(url: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        open_store(url, region="us-east-1")


def test_register_store_plugs_in_a_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "_REGISTRY", dict(storage._REGISTRY))
    built: list[tuple[str, dict[str, object]]] = []

    def factory(url: str, **options: object) -> MemoryStore:
        built.append((url, options))
        return MemoryStore()

    register_store("Mem2", factory)

    assert isinstance(open_store("mem2://anything", flavour="x"), MemoryStore)
    assert built == [("mem2://anything", {"flavour": "x"})]
    with pytest.raises(ValueError, match="already registered"):
        register_store("file", factory)
    register_store("file", factory, replace=True)
    assert isinstance(open_store("file:///tmp/x"), MemoryStore)
