"""loader: single files and folders load into the right pipeline, identical to the model that was saved."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.errors import IncompatibleModelError, SkeletonNotFoundError  # noqa: E402
from pipelines.loader import load_checkpoint, load_vae  # noqa: E402
from tests.tiny import networks  # noqa: E402
from tests.tiny.fixtures import tiny_files  # noqa: E402
from tests.tiny.models import tiny_vae  # noqa: E402

torch.set_num_threads(2)

CLASSES = {"sd15": "StableDiffusionPipeline", "sd15_inpaint": "StableDiffusionInpaintPipeline",
           "sdxl": "StableDiffusionXLPipeline", "sdxl_inpaint": "StableDiffusionXLInpaintPipeline",
           "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}


@pytest.fixture(scope="module")
def files():
    return tiny_files()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch):
    """Any attempt to open a connection fails the test: loading must be air-gapped."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _generate(pipe, kind: str) -> np.ndarray:
    kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np",
              "generator": torch.Generator().manual_seed(0)}
    if kind in ("sd15_inpaint", "sdxl_inpaint"):
        kwargs |= {"image": Image.new("RGB", (64, 64), (90, 120, 200)), "mask_image": Image.new("L", (64, 64), 255)}
    if kind == "sdxl_refiner":
        kwargs |= {"image": torch.full((1, 3, 64, 64), 0.4), "strength": 1.0}
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a cat", **kwargs).images


@pytest.mark.parametrize("kind", list(CLASSES))
def test_single_file_round_trips(files, no_network, kind: str):
    reference = _generate(files.pipeline(kind), kind)
    for variant, tolerance in (({}, 0.0), ({"fmt": "ckpt"}, 0.0), ({"dtype": torch.float16, "extras": True}, 3e-3)):
        pipe = load_checkpoint(files.checkpoint(kind, **variant), skeleton_dirs=[files.skeleton_root])
        assert type(pipe).__name__ == CLASSES[kind]
        assert pipe.unet.dtype == torch.float32 and pipe.unet.device.type == "cpu"
        difference = np.abs(_generate(pipe, kind) - reference).max()
        assert difference <= tolerance, (variant, difference)


def test_fp16_weights_are_the_file_values(files):
    """The fp16 file with EMA: loaded weights are the fp16 non-EMA weights, not the (perturbed) EMA copy."""
    pipe = load_checkpoint(files.checkpoint("sd15", dtype=torch.float16, extras=True), skeleton_dirs=[files.skeleton_root],
                           dtype=torch.float16)
    reference = files.pipeline("sd15").unet.state_dict()
    for key, value in pipe.unet.state_dict().items():
        assert value.dtype == torch.float16
        assert torch.equal(value, reference[key].half()), key


def test_diffusers_folder(files, no_network):
    pipe = load_checkpoint(files.diffusers_folder("sd15"))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert np.abs(_generate(pipe, "sd15") - _generate(files.pipeline("sd15"), "sd15")).max() == 0.0


def test_wrong_kind_of_file_is_named(files, tmp_path: Path):
    lora = networks.write_kohya_lora(tmp_path / "my_model.safetensors", files.pipeline("sd15"))
    with pytest.raises(IncompatibleModelError, match="my_model.safetensors is a lora, not a checkpoint"):
        load_checkpoint(lora, skeleton_dirs=[files.skeleton_root])
    vae = networks.write_vae(tmp_path / "model.ckpt", fmt="ckpt")
    with pytest.raises(IncompatibleModelError, match="model.ckpt is a vae, not a checkpoint"):
        load_checkpoint(vae, skeleton_dirs=[files.skeleton_root])


def test_unknown_architecture_without_skeleton(files):
    with pytest.raises(SkeletonNotFoundError, match="no config skeleton matches"):
        load_checkpoint(files.checkpoint("sd15"))


def test_load_vae_swaps_decoder(files, no_network, tmp_path: Path):
    pipe = load_checkpoint(files.checkpoint("sd15"), skeleton_dirs=[files.skeleton_root])
    base = _generate(pipe, "sd15")
    for fmt in ("safetensors", "ckpt"):
        vae = load_vae(networks.write_vae(tmp_path / f"alt.{fmt}", seed=5, fmt=fmt), like=pipe)
        expected = tiny_vae(5).state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in vae.state_dict().items())
        assert vae.config.scaling_factor == pipe.vae.config.scaling_factor
    original = pipe.vae
    pipe.vae = vae
    swapped = _generate(pipe, "sd15")
    assert np.abs(swapped - base).max() > 1e-2
    pipe.vae = original
    assert np.abs(_generate(pipe, "sd15") - base).max() == 0.0

    sdxl = files.pipeline("sdxl")
    xl_vae = load_vae(tmp_path / "alt.safetensors", like=sdxl, dtype=torch.float16)
    assert xl_vae.dtype == torch.float16 and xl_vae.config.scaling_factor == sdxl.vae.config.scaling_factor


def test_load_vae_rejects_other_files(files, tmp_path: Path):
    pipe = files.pipeline("sd15")
    with pytest.raises(IncompatibleModelError, match="is a checkpoint, not a vae"):
        load_vae(files.checkpoint("sd15"), like=pipe)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    wide = AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=1,
                         norm_num_groups=4)
    from tests.tiny import ldm

    path = ldm.save_state_dict(ldm.vae_to_ldm(wide), tmp_path / "flux_vae.safetensors")
    with pytest.raises(IncompatibleModelError, match="16 latent channels; this pipeline needs 4"):
        load_vae(path, like=pipe)
