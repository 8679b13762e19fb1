"""Skeletons: shipped ones describe the real architectures; choice is by tensors; tokenizers work offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines.errors import ModelFormatError, SkeletonNotFoundError  # noqa: E402
from pipelines.probe import probe  # noqa: E402
from pipelines.skeletons import SHIPPED_ROOT, find_skeleton, list_skeletons, search_path, write_skeleton  # noqa: E402
from tests.tiny.fixtures import meta_components, tiny_files  # noqa: E402

torch.set_num_threads(2)

SHIPPED = {s.name: s for s in list_skeletons()}


def _params(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def test_shipped_skeletons_present_and_small():
    assert {"sd15", "sd15-inpaint", "sdxl-base", "sdxl-inpaint", "sdxl-refiner"} <= set(SHIPPED)
    total = sum(p.stat().st_size for p in SHIPPED_ROOT.rglob("*") if p.is_file())
    assert total < 2_000_000, "vocabulary stored once, no tokenizer.json per skeleton"
    assert not list(SHIPPED_ROOT.rglob("tokenizer.json"))


@pytest.mark.parametrize(
    ("name", "unet", "te1", "te2", "vae"),
    [
        ("sd15", 859_520_964, 123_060_480, 0, 83_653_863),
        ("sdxl-base", 2_567_463_684, 123_060_480, 694_659_840, 83_653_863),
        # refiner UNet: sgm sd_xl_refiner.yaml (384 channels, mult 1/2/4/4, depth 4, context 1280)
        ("sdxl-refiner", 2_259_526_660, 0, 694_659_840, 83_653_863),
    ],
)
def test_shipped_skeletons_have_the_real_parameter_counts(name, unet, te1, te2, vae):
    parts = meta_components(SHIPPED[name].path)
    assert _params(parts.unet) == unet
    assert _params(parts.text_encoder) == te1
    assert _params(parts.text_encoder_2) == te2
    assert _params(parts.vae) == vae


def test_shipped_pipeline_settings():
    def index(name: str) -> dict:
        return json.loads((SHIPPED[name].path / "model_index.json").read_text())

    assert index("sd15")["_class_name"] == "StableDiffusionPipeline"
    assert index("sd15-inpaint")["_class_name"] == "StableDiffusionInpaintPipeline"
    assert index("sdxl-base")["force_zeros_for_empty_prompt"] is True
    refiner = index("sdxl-refiner")
    assert refiner["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and refiner["requires_aesthetics_score"] is True
    assert refiner["text_encoder"] == [None, None] and refiner["tokenizer"] == [None, None]
    vae = json.loads((SHIPPED["sdxl-base"].path / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] is True
    unet = json.loads((SHIPPED["sdxl-refiner"].path / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [384, 768, 1536, 1536] and unet["cross_attention_dim"] == 1280
    assert unet["addition_time_embed_dim"] == 256 and unet["projection_class_embeddings_input_dim"] == 2560


def test_real_clip_tokenizers():
    tokenizers = SHIPPED["sdxl-base"].tokenizers()
    ids = tokenizers["tokenizer"]("a photo of a cat, masterpiece").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 267, 12066, 49407]
    assert len(tokenizers["tokenizer"]) == 49408 and tokenizers["tokenizer"].model_max_length == 77
    padded = tokenizers["tokenizer_2"]("a cat", padding="max_length", max_length=77).input_ids
    assert padded[4] == tokenizers["tokenizer_2"].convert_tokens_to_ids("!") == 0
    assert tokenizers["tokenizer"]("a cat", padding="max_length").input_ids[4] == 49407
    refiner = SHIPPED["sdxl-refiner"].pipeline_kwargs()
    assert refiner["text_encoder"] is None and refiner["tokenizer"] is None and "tokenizer_2" in refiner
    # fresh objects every time: textual inversion adds tokens to them
    again = SHIPPED["sdxl-base"].tokenizers()["tokenizer"]
    tokenizers["tokenizer"].add_tokens(["<my-embedding>"])
    assert len(again) == 49408


def test_tiny_skeletons_use_the_same_format():
    root = tiny_files().skeleton_root
    names = sorted(p.name for p in root.iterdir())
    assert names == ["tiny-sd15", "tiny-sd15-inpaint", "tiny-sdxl", "tiny-sdxl-inpaint", "tiny-sdxl-refiner",
                     "vocabularies"]
    assert sorted(p.name for p in (root / "vocabularies").iterdir()) == ["tiny-bytes"]
    config = json.loads((root / "tiny-sdxl" / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert config["studio_vocabulary"] == "tiny-bytes" and config["pad_token"] == "!"
    assert set(json.loads((root / "tiny-sd15" / "model_index.json").read_text())) == set(
        json.loads((SHIPPED_ROOT / "sd15" / "model_index.json").read_text()))


def test_choice_is_by_tensors_not_names(tmp_path: Path):
    files = tiny_files()
    root = files.skeleton_root
    for kind, skeleton in (("sd15", "tiny-sd15"), ("sd15_inpaint", "tiny-sd15-inpaint"), ("sdxl", "tiny-sdxl"),
                           ("sdxl_inpaint", "tiny-sdxl-inpaint"), ("sdxl_refiner", "tiny-sdxl-refiner")):
        misnamed = tmp_path / "sd15-inpaint-sdxl-refiner.safetensors"
        misnamed.write_bytes(files.checkpoint(kind).read_bytes())
        assert find_skeleton(probe(misnamed).architecture, [root]).name == skeleton


def test_no_matching_skeleton_names_the_architecture(tmp_path: Path):
    arch = probe(tiny_files().checkpoint("sd15")).architecture
    with pytest.raises(SkeletonNotFoundError, match=r"UNet width 32, 4 input channels, context 32") as err:
        find_skeleton(arch)
    assert str(SHIPPED_ROOT) in str(err.value) and "sd15" in str(err.value)


def test_search_path_order_and_overrides(tmp_path: Path):
    files = tiny_files()
    extra = tmp_path / "mine"
    write_skeleton(files.pipeline("sd15"), extra, "custom", vocabulary="tiny-bytes")
    assert search_path([extra])[0] == extra and search_path([extra])[-1] == SHIPPED_ROOT
    arch = probe(files.checkpoint("sd15")).architecture
    assert find_skeleton(arch, [extra, files.skeleton_root]).name == "custom"
    assert find_skeleton(arch, [files.skeleton_root, extra]).name == "tiny-sd15"
    with pytest.raises(FileExistsError):
        write_skeleton(files.pipeline("sd15"), extra, "custom")


def test_broken_vocabulary_reference(tmp_path: Path):
    files = tiny_files()
    skeleton = write_skeleton(files.pipeline("sd15"), tmp_path, "s", vocabulary="tiny-bytes")
    config_path = skeleton.path / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"studio_vocabulary": "../../etc"}))
    with pytest.raises(ModelFormatError, match="names no valid studio_vocabulary"):
        skeleton.tokenizers()
    config_path.write_text(json.dumps(config | {"studio_vocabulary": "missing"}))
    with pytest.raises(ModelFormatError, match="vocabulary 'missing' missing"):
        skeleton.tokenizers()
