"""safe_files: hostile and broken files are refused with clear errors, and pickled code never runs."""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines import safe_files
from pipelines.errors import ModelFormatError, PipelineError, UnsafeModelError
from pipelines.safe_files import FileKind

torch.set_num_threads(2)


class _Payload:
    """Pickles to a call of os.system that would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ModelCheckpoint:
    """Pickles as pytorch_lightning's callback class, like 2022-era checkpoints."""

    def __init__(self) -> None:
        self.best_model_score = 0.5


ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"


def _raw_safetensors(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)},
              str(path), metadata={"ss_network_dim": "4"})
    return path


def test_header_is_read_without_tensors(good: Path):
    header = safe_files.read_safetensors_header(good)
    assert header.shapes() == {"a": (2, 3), "b": (4,)}
    assert header.tensors["a"].dtype == "F32" and header.metadata == {"ss_network_dim": "4"}
    assert header.data_offset + header.tensors["a"].end <= header.file_size
    assert torch.equal(safe_files.load_safetensors(good)["a"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw"])
def test_pickle_with_code_payload_is_rejected_and_never_runs(tmp_path: Path, kind: str):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.zeros(2)}, "x": _Payload(marker)}
    if kind == "zip":
        torch.save(payload, path)
    elif kind == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    for call in (safe_files.load_pickle, safe_files.load_state_dict):
        with pytest.raises(UnsafeModelError) as err:
            call(path)
        assert "evil.ckpt" in str(err.value) and "weights_only=False" not in str(err.value)
    if kind != "raw":
        assert "system" in str(err.value)
    assert not marker.exists()
    assert isinstance(err.value, PipelineError) and isinstance(err.value, ValueError)


def test_torch_zip_renamed_safetensors_is_refused(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, path)
    assert safe_files.detect_kind(path) is FileKind.TORCH_ZIP
    for call in (safe_files.read_safetensors_header, safe_files.load_state_dict, safe_files.load_pickle):
        with pytest.raises(ModelFormatError, match="named .safetensors but contains a PyTorch pickle"):
            call(path)


def test_plain_zip_is_not_a_checkpoint(tmp_path: Path):
    path = tmp_path / "photos.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("cat.txt", "meow")
    with pytest.raises(ModelFormatError, match="photos.ckpt is not a readable PyTorch checkpoint"):
        safe_files.load_state_dict(path)


def test_format_by_content_not_name(tmp_path: Path, good: Path):
    renamed = tmp_path / "actually-safetensors.ckpt"
    renamed.write_bytes(good.read_bytes())
    assert safe_files.detect_kind(renamed) is FileKind.SAFETENSORS
    assert set(safe_files.load_state_dict(renamed)) == {"a", "b"}
    pickled = tmp_path / "weights.bin"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 7}, pickled)
    assert set(safe_files.load_state_dict(pickled)) == {"w"}
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(ModelFormatError, match="not a model file"):
        safe_files.detect_kind(junk)


def test_truncated_files(tmp_path: Path, good: Path):
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-5])
    with pytest.raises(ModelFormatError, match="cut.safetensors is truncated: tensors need"):
        safe_files.read_safetensors_header(cut)
    cut.write_bytes(data[:40])
    with pytest.raises(ModelFormatError, match="truncated: header claims"):
        safe_files.read_safetensors_header(cut)
    cut.write_bytes(data[:5])
    with pytest.raises(ModelFormatError, match="truncated: only 5 bytes"):
        safe_files.read_safetensors_header(cut)
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"w": torch.zeros(1000)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:1500])
    with pytest.raises(ModelFormatError, match="cut.ckpt"):
        safe_files.load_state_dict(ckpt)
    legacy = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(1000)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:300])
    with pytest.raises(ModelFormatError, match="cut.pt"):
        safe_files.load_state_dict(legacy)


def test_huge_header_is_refused_before_reading_it(tmp_path: Path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b'{"a":' + bytes(64))
    with pytest.raises(ModelFormatError, match="exceeds the 104857600-byte limit"):
        safe_files.read_safetensors_header(path)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2],
          "data_offsets": [4, 12]}}, bytes(12), "overlaps"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "gap"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "needs 12 bytes"),
        ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), "unsupported dtype 'Q4'"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(9), "5 bytes after the last tensor"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"k": 1}}, bytes(4),
         "__metadata__ must map strings"),
        ({"a": [1, 2]}, b"", "not an object"),
    ],
)
def test_invalid_headers(tmp_path: Path, header: dict, data: bytes, message: str):
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ModelFormatError, match=message):
        safe_files.read_safetensors_header(path)


def test_header_not_json(tmp_path: Path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        safe_files.read_safetensors_header(path)


def test_old_checkpoint_data_types_load(tmp_path: Path):
    """numpy scalars and Lightning's callback state appear in real 2022 checkpoints: plain data, accepted."""
    import numpy as np

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    module.ModelCheckpoint = ModelCheckpoint
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    sys.modules.update({n: module if n == names[-1] else types.ModuleType(n) for n in names})
    path = tmp_path / "old.ckpt"
    try:
        torch.save({"state_dict": {"w": torch.ones(2)}, "step": np.int64(3), "loss": np.float64(0.1),
                    "callbacks": {"cb": ModelCheckpoint()}}, path)
    finally:
        for name in names:
            sys.modules.pop(name, None)
    loaded = safe_files.load_pickle(path)
    assert loaded["step"] == 3 and loaded["callbacks"]["cb"].state == {"best_model_score": 0.5}
    assert set(safe_files.load_state_dict(path)) == {"w"}


def test_convert_to_safetensors_is_atomic_and_exact(tmp_path: Path):
    weight = torch.randn(4, 4)
    src = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": weight, "tied": weight, "view": weight[1:3]}, "global_step": 9}, src)
    dst = tmp_path / "out" / "model.safetensors"
    safe_files.convert_to_safetensors(src, dst, metadata={"source": "test"})
    out = safe_files.load_safetensors(dst)
    assert torch.equal(out["w"], weight) and torch.equal(out["tied"], weight) and torch.equal(out["view"], weight[1:3])
    assert safe_files.read_safetensors_header(dst).metadata == {"source": "test"}
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.safetensors"]

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"w": torch.ones(1), "x": _Payload(marker)}, evil)
    with pytest.raises(UnsafeModelError):
        safe_files.convert_to_safetensors(evil, tmp_path / "out" / "evil.safetensors")
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.safetensors"] and not marker.exists()


def test_folder_and_missing(tmp_path: Path):
    (tmp_path / "pipe").mkdir()
    with pytest.raises(ModelFormatError, match="without model_index.json"):
        safe_files.detect_kind(tmp_path / "pipe")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert safe_files.detect_kind(tmp_path / "pipe") is FileKind.DIFFUSERS
    with pytest.raises(ModelFormatError, match="does not exist"):
        safe_files.detect_kind(tmp_path / "nope.safetensors")
