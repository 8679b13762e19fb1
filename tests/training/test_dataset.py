"""training.dataset: kohya folders, buckets, batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.training.conftest import write_dataset
from training.dataset import (
    Bucket,
    DatasetError,
    TrainingSet,
    load_pixels,
    make_buckets,
    nearest_bucket,
    scan_folder,
)


def _set(root: Path, **kw) -> TrainingSet:
    args = dict(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                bucket_reso_steps=16) | kw
    return TrainingSet.from_folder(root, **args)


def test_scan_reads_repeats_and_captions(dataset: Path) -> None:
    items = scan_folder(dataset)
    assert [i.path.name for i in items] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert items[0].caption == "red square, simple shape" and items[3].caption == ""  # no .txt: empty caption
    assert {i.repeats for i in items} == {2} and items[2].size == (96, 48)


def test_caption_extension(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    (root / "2_shapes" / "img0.caption").write_text("from caption file")
    assert scan_folder(root, ".caption")[0].caption == "from caption file"


@pytest.mark.parametrize(("layout", "named"), [
    ({"cats/a.png": "png"}, "cats"),
    ({"0_cats/a.png": "png"}, "0_cats"),
    ({"a.png": "png"}, "a.png"),
    ({"3_cats/broken.png": b"not an image"}, "3_cats/broken.png"),
    ({"3_cats/notes.md": b"text"}, "."),
])
def test_bad_layouts_name_the_culprit(tmp_path: Path, layout: dict, named: str) -> None:
    for rel, content in layout.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "png":
            Image.new("RGB", (8, 8)).save(path)
        else:
            path.write_bytes(content)
    with pytest.raises(DatasetError) as err:
        scan_folder(tmp_path)
    assert err.value.path == named and named in str(err.value)
    with pytest.raises(DatasetError):
        scan_folder(tmp_path / "missing")


def test_buckets_stay_within_area_and_steps() -> None:
    buckets = make_buckets((512, 512), 256, 1024, 64)
    assert Bucket(512, 512) in buckets and Bucket(256, 1024) in buckets and Bucket(1024, 256) in buckets
    for b in buckets:
        assert b.width * b.height <= 512 * 512 and b.width % 64 == 0 and b.height % 64 == 0
        assert 256 <= b.width <= 1024 and 256 <= b.height <= 1024
    assert nearest_bucket((1000, 1000), buckets) == Bucket(512, 512)
    assert nearest_bucket((1600, 900), buckets).aspect > 1.5


def test_pixels_are_resized_and_centre_cropped(dataset: Path) -> None:
    item = scan_folder(dataset)[2]  # 96x48 green bar with a white patch at (24..48, 12..24)
    pixels, (top, left) = load_pixels(item, Bucket(48, 32))
    assert pixels.shape == (3, 32, 48) and pixels.min() >= -1 and pixels.max() <= 1
    assert (top, left) == (0, 8)  # scaled to 64x32, 8 px cut on each side
    flipped, _ = load_pixels(item, Bucket(48, 32), flip=True)
    assert torch.equal(flipped, pixels.flip(-1))


def test_batches_hold_one_bucket_and_follow_the_seed(dataset: Path) -> None:
    data = _set(dataset)
    assert data.num_images == 8
    batches = data.epoch_batches(0, 2, seed=1)
    assert sum(len(b) for b in batches) == 8 and len(batches) == data.batches_per_epoch(2)
    for batch in batches:
        assert len({s.bucket for s in batch}) == 1
    assert batches == data.epoch_batches(0, 2, seed=1)
    orders = {tuple(s.index for b in data.epoch_batches(e, 2, seed=1) for s in b) for e in range(6)}
    assert len(orders) > 1  # epochs differ
    square = _set(dataset, enable_bucket=False)
    assert {s.bucket for b in square.epoch_batches(0, 3, 1) for s in b} == {Bucket(64, 64)}


def test_tag_frequency_and_dirs(dataset: Path) -> None:
    data = _set(dataset)
    assert data.tag_frequency()["2_shapes"]["simple shape"] == 3
    assert data.dataset_dirs() == {"2_shapes": {"n_repeats": 2, "img_count": 4}}


def test_links_are_refused(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    secret = tmp_path / "secret.txt"
    secret.write_text("server secret")
    (root / "2_shapes" / "img3.txt").symlink_to(secret)
    with pytest.raises(DatasetError) as err:
        scan_folder(root)
    assert err.value.path == "2_shapes/img3.txt"
    (root / "2_shapes" / "img3.txt").unlink()
    (root / "5_more").symlink_to(root / "2_shapes")
    with pytest.raises(DatasetError) as err:
        scan_folder(root)
    assert err.value.path == "5_more"
