"""A tiny kohya-layout dataset and run files for trainer and CLI tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.tiny.fixtures import tiny_files
from training.runfile import RunSpec

# Coloured squares and bars: simple enough that a tiny UNet learns them in a few dozen steps.
IMAGES = {
    "red square": ((220, 30, 30), (64, 64)),
    "blue square": ((30, 30, 220), (64, 64)),
    "green bar": ((30, 200, 30), (96, 48)),
    "yellow bar": ((230, 220, 40), (48, 96)),
}


def write_dataset(root: Path, *, repeats: int = 2) -> Path:
    """`root/<repeats>_shapes/` with one PNG + caption per entry of IMAGES (the last one uncaptioned)."""
    folder = root / f"{repeats}_shapes"
    folder.mkdir(parents=True)
    for i, (caption, (colour, size)) in enumerate(IMAGES.items()):
        image = Image.new("RGB", size, colour)
        image.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
        image.save(folder / f"img{i}.png")
        if i < len(IMAGES) - 1:
            (folder / f"img{i}.txt").write_text(caption + ", simple shape\n", encoding="utf-8")
    return root


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A config that trains the tiny models in a few seconds on one core."""
    config = {
        "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16,
        "network_dim": 4, "network_alpha": 4, "unet_lr": 1e-2, "text_encoder_lr": 1e-3, "max_train_epochs": 3,
        "train_batch_size": 2, "seed": 7, "save_every_n_epochs": 1,
    }
    return config | overrides


@pytest.fixture(scope="session")
def tiny() -> Any:
    return tiny_files()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "dataset")


def run_spec(tiny: Any, tmp_path: Path, dataset: Path, base_type: str = "sd15", **overrides: Any) -> RunSpec:
    values = dict(base_model=tiny.checkpoint(base_type), base_type=base_type, train_data_dir=dataset,
                  output_dir=tmp_path / "out", state_dir=tmp_path / "state", device="cpu",
                  skeleton_dirs=(tiny.skeleton_root,))
    return RunSpec(**(values | overrides))
