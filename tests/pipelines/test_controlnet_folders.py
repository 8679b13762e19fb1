"""diffusers ControlNet folders packed into one file: the packed file loads with the folder's own config
(not the family skeleton) and gives the folder's outputs; a bad folder is refused naming the problem."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines import safe_files  # noqa: E402
from pipelines.controlnet.folders import CONFIG_KEY, check_folder, is_controlnet_folder, pack_folder  # noqa: E402
from pipelines.controlnet.loader import ControlNetLayout, controlnet_info, load_controlnet  # noqa: E402
from pipelines.errors import PipelineError  # noqa: E402
from tests.tiny import controlnets  # noqa: E402
from tests.tiny.fixtures import tiny_files  # noqa: E402

torch.set_num_threads(2)


def folder_controlnet(unet):
    """A tiny ControlNet whose config says what no tensor shows (pooled residuals, as the shuffle model's),
    so a loader that ignored the folder's config and used the family skeleton would give other outputs."""
    from diffusers import ControlNetModel

    cn = controlnets.tiny_controlnet(unet)
    config = {k: v for k, v in cn.config.items() if not k.startswith("_")}  # _use_default_values would undo it
    pooled = ControlNetModel.from_config({**config, "global_pool_conditions": True})
    pooled.load_state_dict(cn.state_dict())
    return pooled.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    files = tiny_files()
    root = tmp_path_factory.mktemp("cn-folders")
    return {kind: controlnets.write_diffusers_folder(root / f"cn-{kind}", folder_controlnet(files.pipeline(kind).unet))
            for kind in ("sd15", "sdxl")}


def _outputs(model, kind: str):
    torch.manual_seed(0)
    hint = torch.rand(1, 3, 64, 64)
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 4, model.config.cross_attention_dim)
    extra = {}
    if kind == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 64),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        down, mid = model(sample, torch.tensor(10), context, hint, **extra, return_dict=False)
    return [*down, mid]


def _max_diff(outputs, expected) -> float:
    return max((a - b).abs().max().item() for a, b in zip(outputs, expected, strict=True))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_packed_folder_loads_with_its_own_config_and_gives_the_folders_outputs(folders, kind, tmp_path):
    folder = folders[kind]
    packed = pack_folder(folder, tmp_path / "packed.safetensors")
    config = json.loads(safe_files.read_safetensors_header(packed).metadata[CONFIG_KEY])
    assert config["global_pool_conditions"] is True and "_name_or_path" not in config
    info = controlnet_info(packed)
    assert (info.layout, info.family) == (ControlNetLayout.DIFFUSERS_FILE, kind)
    direct, loaded = load_controlnet(folder), load_controlnet(packed)
    for key, value in direct.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    expected = _outputs(direct, kind)
    # equal up to float noise: CPU kernels may round differently for tensors at other memory alignments
    assert _max_diff(_outputs(loaded, kind), expected) < 1e-6
    # the same tensors without the embedded config load with the skeleton (no pooling): other outputs
    bare = load_controlnet(controlnets.write_diffusers_file(tmp_path / "bare.safetensors", direct))
    assert _max_diff(_outputs(bare, kind), expected) > 1e-3


def test_packing_is_deterministic_and_keeps_the_tensor_bytes(folders, tmp_path):
    folder = folders["sd15"]
    first = pack_folder(folder, tmp_path / "a.safetensors")
    second = pack_folder(folder, tmp_path / "b.safetensors")
    assert first.read_bytes() == second.read_bytes()
    original = safe_files.read_safetensors_header(folder / "diffusion_pytorch_model.safetensors")
    packed = safe_files.read_safetensors_header(first)
    with (folder / "diffusion_pytorch_model.safetensors").open("rb") as a, first.open("rb") as b:
        a.seek(original.data_offset)
        b.seek(packed.data_offset)
        assert a.read() == b.read()
    assert packed.data_offset % 8 == 0


def test_an_fp16_only_folder_is_packed(folders, tmp_path):
    folder = tmp_path / "fp16"
    folder.mkdir()
    model = load_controlnet(folders["sd15"]).to(torch.float16)
    model.save_pretrained(folder, variant="fp16")
    assert [p.name for p in folder.glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    loaded = load_controlnet(pack_folder(folder, tmp_path / "p.safetensors"), dtype=torch.float16)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def _broken(folders, tmp_path: Path, name: str) -> Path:
    """A copy of the SD1.5 folder, broken one way."""
    import shutil

    folder = shutil.copytree(folders["sd15"], tmp_path / name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    weights = folder / "diffusion_pytorch_model.safetensors"
    if name == "not-json":
        config_path.write_text("{ not json")
    elif name == "a-list":
        config_path.write_text("[1, 2]")
    elif name == "vae-config":
        config_path.write_text(json.dumps({**config, "_class_name": "AutoencoderKL"}))
    elif name == "unbuildable":
        config_path.write_text(json.dumps({**config, "down_block_types": ["NoSuchBlock2D"] * 2}))
    elif name == "other-widths":
        config_path.write_text(json.dumps({**config, "block_out_channels": [64, 128]}))
    elif name == "no-weights":
        weights.unlink()
    elif name == "pickled-weights":
        weights.rename(folder / "diffusion_pytorch_model.bin")
    elif name == "linked-out":
        outside = tmp_path / "elsewhere.safetensors"
        weights.rename(outside)
        weights.symlink_to(outside)
    elif name == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    return folder


@pytest.mark.parametrize(("name", "message"), [
    ("not-json", r"config\.json is not valid JSON"),
    ("a-list", r"config\.json is a JSON list, not an object"),
    ("vae-config", r"describes a 'AutoencoderKL', not a ControlNetModel"),
    ("unbuildable", r"does not describe a ControlNet diffusers can build.*NoSuchBlock2D"),
    ("other-widths", r"the weights do not fill the ControlNet its config describes: .*wrong shape"),
    ("no-weights", r"needs diffusion_pytorch_model\.safetensors"),
    ("pickled-weights", r"has diffusion_pytorch_model\.bin: pickled weights are not read"),
    ("linked-out", r"is a link to .*elsewhere\.safetensors, outside the folder"),
    ("truncated", r"truncated"),
])
def test_a_bad_folder_is_refused_naming_the_problem_and_writes_nothing(folders, tmp_path, name, message):
    folder = _broken(folders, tmp_path, name)
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match=message):
        pack_folder(folder, out / "packed.safetensors")
    assert not out.exists() or not any(out.iterdir())


def test_is_controlnet_folder_looks_at_the_config_class(folders, tmp_path):
    assert is_controlnet_folder(folders["sdxl"])
    assert check_folder(folders["sdxl"]).weights.name == "diffusion_pytorch_model.safetensors"
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert not is_controlnet_folder(vae) and not is_controlnet_folder(tmp_path / "missing")
