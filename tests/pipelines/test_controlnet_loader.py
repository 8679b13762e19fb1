"""ControlNet files: every layout through the real loader, base checks, unsafe pickles, cache, effect."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines.cache import PipelineCache  # noqa: E402
from pipelines.controlnet.loader import (  # noqa: E402
    SKELETONS,
    BaseMismatch,
    ControlNetLayout,
    controlnet_info,
    load_controlnet,
    skeleton_config,
)
from pipelines.errors import UnsafeModelError  # noqa: E402
from pipelines.probe import Base, probe_tensors  # noqa: E402
from tests.tiny import controlnets  # noqa: E402
from tests.tiny.fixtures import tiny_files  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def files():
    return tiny_files()


@pytest.fixture(scope="module")
def tiny_cns(files):
    return {kind: controlnets.tiny_controlnet(files.pipeline(kind).unet) for kind in ("sd15", "sdxl")}


def _writers(tmp_path: Path, kind: str, cn):
    return {
        "ldm": (controlnets.write_ldm(tmp_path / f"{kind}.safetensors", cn), ControlNetLayout.LDM),
        "ldm-bare-fp16": (controlnets.write_ldm(tmp_path / f"{kind}-bare.safetensors", cn, prefix="",
                                                dtype=torch.float16), ControlNetLayout.LDM),
        "pth": (controlnets.write_ldm(tmp_path / f"{kind}.pth", cn, fmt="ckpt"), ControlNetLayout.LDM),
        "diffusers-file": (controlnets.write_diffusers_file(tmp_path / f"{kind}-d.safetensors", cn),
                           ControlNetLayout.DIFFUSERS_FILE),
        "diffusers-folder": (controlnets.write_diffusers_folder(tmp_path / f"{kind}-folder", cn),
                             ControlNetLayout.DIFFUSERS_FOLDER),
    }


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_every_layout_loads_the_same_weights(tiny_cns, kind, tmp_path: Path):
    """SDXL in LDM layout is converted (label_emb -> add_embedding), not refused."""
    reference = tiny_cns[kind]
    hint = torch.rand(1, 3, 64, 64)
    sample, t = torch.randn(1, 4, 8, 8), torch.tensor(10)
    context = torch.randn(1, 4, reference.config.cross_attention_dim)
    extra = {}
    if kind == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 64), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        expected = reference(sample, t, context, hint, **extra, return_dict=False)
    for name, (path, layout) in _writers(tmp_path, kind, reference).items():
        info = controlnet_info(path)
        assert (info.layout, info.family) == (layout, kind), name
        loaded = load_controlnet(path, dtype=torch.float32)
        tolerance = 1e-3 if "fp16" in name else 0
        for key, value in reference.state_dict().items():
            assert torch.allclose(loaded.state_dict()[key], value, atol=tolerance, rtol=0), (name, key)
        with torch.no_grad():
            got = loaded(sample, t, context, hint, **extra, return_dict=False)
        assert torch.allclose(got[1], expected[1], atol=10 * tolerance + 1e-6), name  # same config, same outputs


def test_probe_reports_the_base_of_real_layouts():
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    for family, base in (("sd15", Base.SD1), ("sdxl", Base.SDXL)):
        with init_empty_weights():
            model = ControlNetModel.from_config(skeleton_config(family))
        assert probe_tensors({k: tuple(v.shape) for k, v in model.state_dict().items()}).base is base, family
    assert set(SKELETONS) == {"sd15", "sdxl"}


def test_base_mismatch_names_the_unit(files, tiny_cns, tmp_path: Path):
    sd15 = controlnet_info(controlnets.write_ldm(tmp_path / "canny.safetensors", tiny_cns["sd15"]))
    sd15.check_fits(files.pipeline("sd15").unet.config, unit=0, name="canny", checkpoint_base="sd1")
    with pytest.raises(BaseMismatch, match=r"ControlNet unit 1 \(canny\) is for an unknown base but the checkpoint is "
                                            r"SDXL"):
        sd15.check_fits(files.pipeline("sdxl").unet.config, unit=1, name="canny", checkpoint_base="sdxl")
    xl = controlnet_info(controlnets.write_diffusers_file(tmp_path / "xl.safetensors", tiny_cns["sdxl"]))
    with pytest.raises(BaseMismatch, match=r"unit 2 \(xl\) is for SDXL but the checkpoint is SD1.x"):
        xl.check_fits(files.pipeline("sd15").unet.config, unit=2, name="xl", checkpoint_base="sd1-inpaint")


def test_pickle_payload_is_refused_without_running(tmp_path: Path):
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "control_evil.pth"
    with path.open("wb") as f:
        pickle.dump({"control_model.input_hint_block.0.weight": Payload()}, f, protocol=2)
    with pytest.raises(UnsafeModelError, match="rejected without running"):
        load_controlnet(path)
    assert not marker.exists()


def test_cache_shares_loaded_controlnets(tiny_cns, tmp_path: Path):
    path = controlnets.write_ldm(tmp_path / "cn.safetensors", tiny_cns["sd15"])
    cache = PipelineCache(budget_bytes=1 << 30)
    first = cache.controlnet(path, sha256="a" * 64)
    assert cache.controlnet(path, sha256="a" * 64) is first
    assert cache.stats().misses == 1 and cache.stats().used_bytes > 0
    assert [e.key for e in cache.stats().entries] == ["controlnet:sha256:" + "a" * 64]
    assert cache.evict(path, sha256="a" * 64) and len(cache) == 0


def test_controlnet_changes_the_image_and_scale_zero_is_plain_txt2img(files, tiny_cns, tmp_path: Path):
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image

    from pipelines.loader import load_checkpoint

    pipe = load_checkpoint(files.checkpoint("sd15"), skeleton_dirs=[files.skeleton_root])
    pipe.set_progress_bar_config(disable=True)
    controlnet = load_controlnet(controlnets.write_ldm(tmp_path / "cn.safetensors", tiny_cns["sd15"]))
    control = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    hint = Image.fromarray((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy())
    args = {"prompt": "a photo of a cat", "num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np"}

    def run(target, **kwargs):
        return target(**args, **kwargs, generator=torch.Generator().manual_seed(5)).images

    plain = run(pipe)
    off = run(control, image=hint, controlnet_conditioning_scale=0.0)
    on = run(control, image=hint, controlnet_conditioning_scale=1.0)
    assert (off == plain).all()
    assert abs(on - plain).max() > 1e-3
