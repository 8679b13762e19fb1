"""hashes: A1111's short hashes, checked against hashlib on the same bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines import hashes

torch.set_num_threads(2)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def big_safetensors(tmp_path: Path) -> Path:
    """~1.3 MB, so the legacy window (64 KiB at 1 MiB) lies inside the data section."""
    path = tmp_path / "model.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(300, 1000, generator=generator), "b": torch.randn(7, generator=generator)},
              str(path), metadata={"ss_output_name": "model"})
    return path


def test_all_hashes_in_one_pass_match_hashlib(big_safetensors: Path):
    data = big_safetensors.read_bytes()
    header = int.from_bytes(data[:8], "little")
    seen: list[tuple[int, int]] = []
    result = hashes.hash_file(big_safetensors, chunk_bytes=100_000, progress=lambda done, total: seen.append((done, total)))
    assert result.sha256 == _sha(data)
    assert result.autov2 == _sha(data)[:10]
    assert result.legacy == _sha(data[0x100000:0x110000])[:8]
    assert result.data_sha256 == _sha(data[8 + header:])
    assert result.autov3 == _sha(data[8 + header:])[:12] and result.metadata_hash is None
    assert result.textual_inversion == _sha(data)[:12]
    assert seen[-1] == (len(data), len(data)) and len(seen) == -(-len(data) // 100_000)
    assert hashes.sha256_file(big_safetensors) == result.sha256
    assert hashes.autov2(big_safetensors) == result.autov2
    assert hashes.legacy_hash(big_safetensors) == result.legacy
    assert hashes.lora_hash(big_safetensors) == result.autov3
    assert hashes.textual_inversion_hash(big_safetensors) == result.textual_inversion


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_chunk_boundaries_do_not_matter(tmp_path: Path, chunk: int):
    path = tmp_path / "small.safetensors"
    save_file({"x": torch.arange(50, dtype=torch.float32)}, str(path))
    data = path.read_bytes()
    result = hashes.hash_file(path, chunk_bytes=chunk)
    header = int.from_bytes(data[:8], "little")
    assert (result.sha256, result.data_sha256) == (_sha(data), _sha(data[8 + header:]))
    assert result.legacy == _sha(b"")[:8]  # A1111 hashes whatever the window holds: nothing here


def test_lora_hash_survives_metadata_edits(tmp_path: Path):
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    save_file(tensors, str(one), metadata={"ss_output_name": "one"})
    save_file(tensors, str(two), metadata={"ss_output_name": "a much longer name", "ss_tag_frequency": "{}"})
    assert hashes.sha256_file(one) != hashes.sha256_file(two)
    assert hashes.lora_hash(one) == hashes.lora_hash(two)


def test_sshs_model_hash_is_used_only_when_valid(tmp_path: Path):
    tensors = {"w": torch.ones(3)}
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    claimed = "AB" * 32
    save_file(tensors, str(good), metadata={"sshs_model_hash": claimed})
    save_file(tensors, str(bad), metadata={"sshs_model_hash": "not-a-hash; rm -rf /"})
    assert hashes.lora_hash(good) == claimed.lower()[:12]
    assert hashes.hash_file(good).lora_sha256 == claimed.lower()
    data = bad.read_bytes()
    assert hashes.lora_hash(bad) == _sha(data[8 + int.from_bytes(data[:8], "little"):])[:12]


def test_kohya_sshs_hash_equals_ours(tmp_path: Path):
    from tests.tiny import networks
    from tests.tiny.fixtures import tiny_files

    path = networks.write_kohya_lora(tmp_path / "l.safetensors", tiny_files().pipeline("sd15"), sshs_hash=True)
    result = hashes.hash_file(path)
    assert result.metadata_hash == result.data_sha256  # sd-scripts' definition = the bytes after the header


def test_pickled_files_hash_whole_file(tmp_path: Path):
    path = tmp_path / "emb.pt"
    torch.save({"string_to_param": {"*": torch.ones(2, 8)}}, path)
    data = path.read_bytes()
    result = hashes.hash_file(path)
    assert result.data_sha256 is None and result.autov3 == _sha(data)[:12]
    assert hashes.lora_hash(path) == _sha(data)[:12]


def test_streaming_reads_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Never more than one chunk per read, however large the file."""
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    sizes: list[int] = []
    real_open = Path.open

    def spy_open(self, *args, **kwargs):
        handle = real_open(self, *args, **kwargs)
        original = handle.read

        def read(n=-1):
            sizes.append(n)
            return original(n)

        handle.read = read
        return handle

    monkeypatch.setattr(Path, "open", spy_open)
    hashes.hash_file(path, chunk_bytes=1 << 20)
    assert sizes and all(0 < n <= 1 << 20 for n in sizes)
