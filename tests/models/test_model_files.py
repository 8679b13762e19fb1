"""ModelFiles: materialise from the store once, verify, reuse after restart, evict LRU but never pinned."""

from __future__ import annotations

import hashlib
import io
import threading

import pytest

from deploy.model_files import ModelFileError, ModelFileRef, ModelFiles
from deploy.storage import ChecksumMismatch, MemoryStore


class CountingStore(MemoryStore):
    """Counts opens, and can hold every open until released (to make concurrent fetches overlap)."""

    def __init__(self) -> None:
        super().__init__()
        self.opens: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def open(self, key: str):
        self.opens.append(key)
        self.gate.wait(10)
        return super().open(key)


def _put(store, name: str, size: int, fill: int) -> ModelFileRef:
    data = bytes([fill]) * size
    sha = hashlib.sha256(data).hexdigest()
    key = f"models/lora/{sha}/{name}.safetensors"
    store.put(key, io.BytesIO(data))
    return ModelFileRef(sha256=sha, store_key=key, local_path=None, size=size)


def test_fetch_once_verify_and_reuse_after_restart(tmp_path):
    store = CountingStore()
    ref = _put(store, "a", 1000, 1)
    files = ModelFiles(store, tmp_path, budget_bytes=10_000)
    path = files.path_for(ref)
    assert path.read_bytes() == b"\x01" * 1000 and path.name == f"{ref.sha256}.safetensors"
    assert files.path_for(ref) == path and len(store.opens) == 1
    restarted = ModelFiles(store, tmp_path, budget_bytes=10_000)
    assert restarted.is_cached(ref) and restarted.path_for(ref) == path and len(store.opens) == 1


def test_concurrent_requests_download_once(tmp_path):
    store = CountingStore()
    ref = _put(store, "a", 50_000, 2)
    files = ModelFiles(store, tmp_path, budget_bytes=10**6)
    store.gate.clear()
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(files.path_for(ref))) for _ in range(6)]
    for t in threads:
        t.start()
    store.gate.set()
    for t in threads:
        t.join(10)
    assert len(results) == 6 and len(set(results)) == 1
    assert store.opens == [ref.store_key]


def test_checksum_mismatch_discards_the_download(tmp_path):
    store = MemoryStore()
    ref = _put(store, "a", 100, 3)
    wrong = ModelFileRef(sha256="0" * 64, store_key=ref.store_key, local_path=None, size=100)
    files = ModelFiles(store, tmp_path, budget_bytes=10_000)
    with pytest.raises(ChecksumMismatch):
        files.path_for(wrong)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and ".locks" not in p.parts] == []


def test_lru_eviction_never_removes_pinned_files(tmp_path):
    store = MemoryStore()
    a, b, c = (_put(store, n, 400, i) for i, n in enumerate("abc"))
    files = ModelFiles(store, tmp_path, budget_bytes=1000)
    path_a = files.path_for(a)
    path_b = files.path_for(b)
    files.path_for(a)  # a is now more recent than b
    path_c = files.path_for(c)  # over budget: b (least recently used) goes
    assert path_a.exists() and path_c.exists() and not path_b.exists()
    assert files.cached_bytes() == 800
    with files.pinned(a, c):
        files.path_for(b)  # a and c are pinned: the cache goes over budget rather than evict them
        assert path_a.exists() and path_c.exists()
        assert files.cached_bytes() == 1200
    assert files.cached_bytes() <= 1000  # unpinning let eviction catch up
    assert files.path_for(b).exists()  # the newest stays


def test_in_place_files_are_used_where_they_are(tmp_path):
    local = tmp_path / "model.safetensors"
    local.write_bytes(b"x" * 10)
    ref = ModelFileRef(sha256=hashlib.sha256(b"x" * 10).hexdigest(), store_key=None, local_path=str(local), size=10)
    files = ModelFiles(MemoryStore(), tmp_path / "cache", budget_bytes=100)
    assert files.path_for(ref) == local
    local.unlink()
    with pytest.raises(ModelFileError):
        files.path_for(ref)


def test_an_in_place_file_edited_on_disk_is_never_loaded_as_the_registered_model(tmp_path, monkeypatch):
    local = tmp_path / "model.safetensors"
    local.write_bytes(b"x" * 10)
    sha = hashlib.sha256(b"x" * 10).hexdigest()
    in_place = ModelFileRef(sha256=sha, store_key=None, local_path=str(local), size=10)
    files = ModelFiles(MemoryStore(), tmp_path / "cache", budget_bytes=100)
    assert files.path_for(in_place) == local
    # verified once: a restart does not hash the file again while its size and mtime stay
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: hashed.append(1) or real_sha256(*a))
    again = ModelFiles(MemoryStore(), tmp_path / "cache", budget_bytes=100)
    assert again.path_for(in_place) == local and hashed == []
    # same size, other bytes (a file swapped under the same name): refused, with the reason
    local.write_bytes(b"y" * 10)
    with pytest.raises(ModelFileError, match="changed on disk"):
        again.path_for(in_place)
    assert hashed, "a new mtime means hashing again"
    with pytest.raises(ModelFileError, match="changed on disk"):
        again.path_for(ModelFileRef(sha256=sha, store_key=None, local_path=str(local), size=11))
    # with a copy in the asset store the job still gets the registered bytes
    store = MemoryStore()
    store.put("models/x", io.BytesIO(b"x" * 10))
    backed = ModelFiles(store, tmp_path / "cache2", budget_bytes=100)
    path = backed.path_for(ModelFileRef(sha256=sha, store_key="models/x", local_path=str(local), size=10))
    assert path != local and path.read_bytes() == b"x" * 10


def test_ref_validation():
    with pytest.raises(ValueError):
        ModelFileRef(sha256="xyz", store_key="k", local_path=None, size=1)
    with pytest.raises(ValueError):
        ModelFileRef(sha256="a" * 64, store_key=None, local_path=None, size=1)
    ref = ModelFileRef(sha256="a" * 64, store_key="k", local_path=None, size=1, file_format="pickle")
    assert ref.suffix == ".pt" and ModelFileRef.from_dict(ref.to_dict()) == ref
