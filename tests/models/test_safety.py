"""Bad files through the real import paths: nothing runs, nothing is stored, no row is left behind."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest

from tests.models.conftest import admin_of, store_keys, wait_task
from webapp.services.errors import InvalidInput


class _Payload:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(path: Path, marker: Path) -> Path:
    with path.open("wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.x": _Payload(marker)}}, f, protocol=2)
    return path


def _bad_files(root: Path, tiny, marker: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words the refusal must contain)."""
    root.mkdir(parents=True, exist_ok=True)
    zipped = root / "archive.safetensors"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("readme.txt", "not a model")
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(tiny.lora.read_bytes()[:-100])
    huge = root / "huge-header.safetensors"
    huge.write_bytes(struct.pack("<Q", 2 * 1024**3) + b'{"a": ' + b" " * 64)
    offsets = root / "bad-offsets.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}}'
    offsets.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    dtype = root / "bad-dtype.safetensors"
    header = b'{"w": {"dtype": "X99", "shape": [4], "data_offsets": [0, 16]}}'
    dtype.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    return {
        "zip renamed .safetensors": (zipped, "safetensors"),
        "truncated": (truncated, "truncated"),
        "huge header": (huge, "limit"),
        "bad offsets": (offsets, "offsets"),
        "bad dtype": (dtype, "dtype"),
        "pickle with os.system": (_evil_pickle(root / "evil.ckpt", marker), "posix.system"),
    }


def test_bad_files_refused_by_register_file(mstudio, tiny, tmp_path):
    marker = tmp_path / "PWNED"
    for label, (path, words) in _bad_files(tmp_path / "bad", tiny, marker).items():
        with pytest.raises(InvalidInput) as caught:
            mstudio.models.register_file(actor=admin_of(mstudio), path=path, declared_type="checkpoint")
        assert caught.value.field == "file", label
        assert words in caught.value.message or words.split(".")[-1] in caught.value.message, \
            (label, caught.value.message)
        assert path.name in caught.value.message, label
    assert not marker.exists()
    assert mstudio.models.count_models(actor=admin_of(mstudio), status=None) == 0
    assert store_keys(mstudio) == []


def test_bad_files_through_server_import_and_upload_leave_nothing(mstudio, tiny, import_root, admin_http):
    marker = import_root.parent / "PWNED"
    bad = _bad_files(import_root / "bad", tiny, marker)
    task = mstudio.model_services.server.start(actor=admin_of(mstudio), paths=[str(p) for p, _ in bad.values()],
                                               in_place=False)
    done = wait_task(mstudio, task.id)
    assert done.status.value == "failed"
    import json

    items = json.loads(done.items_json)
    assert [i["state"] for i in items] == ["failed"] * len(bad)
    for item, (_path, words) in zip(items, bad.values(), strict=True):
        assert words.split(".")[-1] in item["message"], item
    # the browser path: an upload of the payload pickle is refused after arriving, bytes and row removed
    payload = bad["pickle with os.system"][0].read_bytes()
    created = admin_http.post("/api/v1/uploads", json={"file_name": "evil.ckpt", "size": len(payload),
                                                       "type": "checkpoint"}).json()
    assert admin_http.get("/api/v1/models", params={"status": "Initial"}).json()["total"] == 1
    put = admin_http.put(f"/api/v1/uploads/{created['id']}", content=payload,
                         headers={"content-range": f"bytes 0-{len(payload) - 1}/{len(payload)}"})
    assert put.status_code == 200, put.text
    task = admin_http.post(f"/api/v1/uploads/{created['id']}/complete").json()
    final = wait_task(mstudio, task["id"])
    assert final.status.value == "failed" and "system" in json.loads(final.items_json)[0]["message"]
    assert not marker.exists()
    assert admin_http.get("/api/v1/models", params={"status": "all"}).json()["total"] == 0
    assert store_keys(mstudio) == []
    assert not any((mstudio.settings.data_dir / "uploads").iterdir())
    assert not any((mstudio.settings.data_dir / "tmp" / "imports").glob("task-*"))
