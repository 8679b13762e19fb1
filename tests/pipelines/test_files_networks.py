"""The network-file writers produce files real loaders accept, with the content they claim."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import networks  # noqa: E402
from tests.tiny.models import tiny_sd15, tiny_sdxl, tiny_vae  # noqa: E402

torch.set_num_threads(2)


def _image(pipe, prompt: str = "a photo of a cat"):
    out = pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return out.images


@pytest.mark.parametrize(
    ("kind", "names", "conv"),
    [("sd15", "diffusers", False), ("sd15", "diffusers", True), ("sdxl", "sgm", False), ("sdxl", "diffusers", True)],
)
def test_kohya_lora_loads_and_equals_manual_merge(tmp_path: Path, kind: str, names: str, conv: bool):
    build = tiny_sd15 if kind == "sd15" else tiny_sdxl
    pipe = build(tmp_path / "tok")
    base = _image(pipe)
    path = networks.write_kohya_lora(tmp_path / "l.safetensors", pipe, rank=4, alpha=2.0, sdxl_names=names, conv=conv)
    assert (_image(pipe) == base).all(), "writing a LoRA must leave the pipeline unchanged"

    reference = _image(networks.merged_copy(build(tmp_path / "tok"), path))
    pipe.load_lora_weights(str(path), adapter_name="test")
    loaded = _image(pipe)
    assert abs(loaded - base).max() > 1e-2
    assert abs(loaded - reference).max() < 1e-4


def test_kohya_lora_names_and_metadata(tmp_path: Path):
    from safetensors import safe_open

    pipe = tiny_sdxl(tmp_path / "tok")
    path = networks.write_kohya_lora(tmp_path / "x.safetensors", pipe, sdxl_names="sgm", conv=True, rank=2, alpha=1.0)
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha")
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys  # L=1: 1+1*2+0
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in keys  # LoCon conv in sgm names
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    assert float(alpha) == 1.0
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1.0"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_output_name"] == "x"


def test_kohya_lora_sd15_text_encoder_names(tmp_path: Path):
    from safetensors import safe_open

    pipe = tiny_sd15(tmp_path / "tok")
    path = networks.write_kohya_lora(tmp_path / "y.safetensors", pipe, unet=False, ss_metadata=False)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() is None
    assert keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_textual_inversion_sd15(tmp_path: Path, fmt: str):
    pipe = tiny_sd15(tmp_path / "tok")
    base = _image(pipe, "a photo of zq")
    path = networks.write_textual_inversion(tmp_path / f"emb.{fmt}", pipe, vectors=2, fmt=fmt)
    pipe.load_textual_inversion(str(path), token="zq")
    assert len(pipe.tokenizer) == len(tiny_sd15(tmp_path / "tok").tokenizer) + 2
    assert abs(_image(pipe, "a photo of zq") - base).max() > 1e-3


def test_textual_inversion_pt_is_a1111_layout_and_weights_only(tmp_path: Path):
    pipe = tiny_sd15(tmp_path / "tok")
    path = networks.write_textual_inversion(tmp_path / "e.pt", pipe, vectors=3, seed=4)
    data = torch.load(path, weights_only=True)
    assert data["string_to_token"] == {"*": 265}
    assert data["string_to_param"]["*"].shape == (3, 32)
    again = networks.write_textual_inversion(tmp_path / "f.pt", pipe, vectors=3, seed=4)
    assert torch.equal(torch.load(again, weights_only=True)["string_to_param"]["*"], data["string_to_param"]["*"])


def test_textual_inversion_sdxl(tmp_path: Path):
    from safetensors.torch import load_file

    pipe = tiny_sdxl(tmp_path / "tok")
    path = networks.write_textual_inversion(tmp_path / "x.safetensors", pipe, fmt="sdxl", vectors=2)
    sd = load_file(str(path))
    assert sd["clip_l"].shape == (2, 32) and sd["clip_g"].shape == (2, 64)
    pipe.load_textual_inversion(sd["clip_l"], token="zq", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token="zq", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    ids = pipe.tokenizer_2("zq").input_ids
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids[1]], sd["clip_g"][0])


def test_hypernetwork_layout(tmp_path: Path):
    pipe = tiny_sd15(tmp_path / "tok")
    path = networks.write_hypernetwork(tmp_path / "h.pt", pipe, layer_structure=(1, 2, 1), activation="relu")
    data = torch.load(path, weights_only=True)
    dims = [k for k in data if isinstance(k, int)]
    assert dims == [32, 64]  # cross-attention context 32; self-attention widths 64
    k_sd, v_sd = data[64]
    assert set(k_sd) == {"linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias"}
    assert k_sd["linear.0.weight"].shape == (128, 64) and k_sd["linear.2.weight"].shape == (64, 128)
    assert k_sd["linear.0.weight"].abs().mean() > 0.01 and not torch.equal(k_sd["linear.0.weight"],
                                                                            v_sd["linear.0.weight"])
    assert data["layer_structure"] == [1, 2, 1] and data["activation_func"] == "relu"
    with pytest.raises(ValueError, match="activation"):
        networks.write_hypernetwork(tmp_path / "bad.pt", pipe, activation="nope")


def test_vae_file_loads_single_file(tmp_path: Path):
    from diffusers import AutoencoderKL

    from tests.tiny.fixtures import tiny_files

    skeleton = tiny_files().skeleton_root / "tiny-sd15"
    path = networks.write_vae(tmp_path / "tiny.vae.safetensors", seed=5)
    loaded = AutoencoderKL.from_single_file(str(path), config=str(skeleton), subfolder="vae", local_files_only=True)
    reference = tiny_vae(5)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not torch.equal(tiny_vae(1).decoder.conv_out.weight, loaded.decoder.conv_out.weight)


def test_ldm_controlnet_round_trip(tmp_path: Path):
    """The LDM ControlNet writer matches diffusers' reader exactly (SD1.5 layout)."""
    from diffusers import ControlNetModel

    pipe = tiny_sd15(tmp_path / "tok")
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    torch.manual_seed(3)
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.normal_(0, 0.02)
    from tests.tiny import ldm

    for fmt, dtype in (("safetensors", torch.float32), ("ckpt", torch.float16)):
        path = ldm.write_controlnet(tmp_path / f"cn.{fmt}", controlnet, dtype=dtype, fmt=fmt)
        controlnet.save_config(tmp_path / "cn_config")
        loaded = ControlNetModel.from_single_file(str(path), config=str(tmp_path / "cn_config"), local_files_only=True)
        for key, value in controlnet.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value.to(dtype).float()), (fmt, key)
