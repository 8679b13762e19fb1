"""probe: every model type and base is told from its tensors, whatever the file is called."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pipelines.errors import ModelFormatError, UnknownModelTypeError  # noqa: E402
from pipelines.probe import Base, ModelType, probe, probe_tensors  # noqa: E402
from pipelines.safe_files import FileKind  # noqa: E402
from tests.tiny import ldm, networks  # noqa: E402
from tests.tiny.fixtures import tiny_files  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def files():
    return tiny_files()


@pytest.mark.parametrize(
    ("kind", "base", "inpaint", "components"),
    [
        ("sd15", Base.SD1, False, ("unet", "vae", "text_encoder")),
        ("sd15_inpaint", Base.SD1, True, ("unet", "vae", "text_encoder")),
        ("sdxl", Base.SDXL, False, ("unet", "vae", "text_encoder", "text_encoder_2")),
        ("sdxl_inpaint", Base.SDXL, True, ("unet", "vae", "text_encoder", "text_encoder_2")),
        ("sdxl_refiner", Base.SDXL_REFINER, False, ("unet", "vae", "text_encoder_2")),
    ],
)
def test_checkpoints(files, tmp_path: Path, kind, base, inpaint, components):
    for variant in ({}, {"dtype": torch.float16, "extras": True}, {"fmt": "ckpt"}):
        path = files.checkpoint(kind, **variant)
        # the name must not matter: call it something misleading
        misleading = tmp_path / f"sdxl_lora_vae_{kind}{path.suffix}"
        shutil.copy(path, misleading)
        info = probe(misleading)
        assert info.type is ModelType.CHECKPOINT and info.base is base and info.inpaint is inpaint, variant
        assert info.supported and info.details["components"] == components
        assert info.details["ema"] is bool(variant.get("extras"))
        assert info.format is (FileKind.TORCH_ZIP if variant.get("fmt") else FileKind.SAFETENSORS)
        expected_dtype = {"F16": torch.float16}.get(info.details["dtype"], torch.float32)
        assert expected_dtype == variant.get("dtype", torch.float32)
        assert info.architecture.unet_in_channels == (9 if inpaint else 4)


def test_diffusers_folder(files):
    info = probe(files.diffusers_folder("sdxl"))
    assert (info.type, info.base, info.format) == (ModelType.CHECKPOINT, Base.SDXL, FileKind.DIFFUSERS)
    assert info.architecture == probe(files.checkpoint("sdxl")).architecture


def test_loras(files, tmp_path: Path):
    sd15, sdxl = files.pipeline("sd15"), files.pipeline("sdxl")
    info = probe(networks.write_kohya_lora(tmp_path / "a.safetensors", sd15, rank=4, alpha=2.0))
    assert (info.type, info.base) == (ModelType.LORA, Base.SD1)
    assert info.details["network"] == "lora" and info.details["rank"] == 4 and info.details["alpha"] == 2.0
    assert info.details["text_encoder"] and info.details["unet"] and info.details["naming"] == "kohya"

    info = probe(networks.write_kohya_lora(tmp_path / "b.safetensors", sd15, conv=True, text_encoder=False,
                                           ss_metadata=False, rank=2))
    assert info.details["network"] == "locon" and not info.details["text_encoder"] and info.details["rank"] == 2
    assert info.base is None  # tiny context width, no metadata: honestly unknown

    info = probe(networks.write_kohya_lora(tmp_path / "c.safetensors", sdxl, sdxl_names="sgm", ss_metadata=False))
    assert info.base is Base.SDXL
    info = probe(networks.write_kohya_lora(tmp_path / "d.safetensors", sdxl, text_encoder=False, ss_metadata=False,
                                           sdxl_names="sgm"))
    assert info.base is Base.SDXL and not info.details["text_encoder"]


def test_real_width_lora_bases(tmp_path: Path):
    for width, base in ((768, Base.SD1), (1024, Base.SD2), (2048, Base.SDXL)):
        name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        shapes = {f"{name}.lora_down.weight": (8, width), f"{name}.lora_up.weight": (320, 8), f"{name}.alpha": ()}
        assert probe_tensors(shapes).base is base


def test_loha_and_lokr_are_reported_unsupported(tmp_path: Path):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "loha.safetensors"
    save_file({f"{name}.hada_w1_a": torch.zeros(8, 4), f"{name}.hada_w1_b": torch.zeros(4, 8),
               f"{name}.hada_w2_a": torch.zeros(8, 4), f"{name}.hada_w2_b": torch.zeros(4, 8),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    info = probe(path)
    assert info.type is ModelType.LORA and not info.supported and info.details["network"] == "loha"
    assert "LOHA" in info.problem
    info = probe_tensors({f"{name}.lokr_w1": (4, 4), f"{name}.lokr_w2": (8, 8)})
    assert info.details["network"] == "lokr" and not info.supported


def test_textual_inversions(files, tmp_path: Path):
    sd15, sdxl = files.pipeline("sd15"), files.pipeline("sdxl")
    info = probe(networks.write_textual_inversion(tmp_path / "e.pt", sd15, vectors=3, name="mystyle"))
    assert (info.type, info.format) == (ModelType.TEXTUAL_INVERSION, FileKind.TORCH_ZIP)
    assert info.details == {"vectors": 3, "width": 32, "name": "mystyle"}
    info = probe(networks.write_textual_inversion(tmp_path / "e.safetensors", sd15, vectors=2, fmt="safetensors"))
    assert info.type is ModelType.TEXTUAL_INVERSION and info.details["vectors"] == 2
    info = probe(networks.write_textual_inversion(tmp_path / "x.safetensors", sdxl, vectors=2, fmt="sdxl"))
    assert info.base is Base.SDXL and info.details == {"vectors": 2, "width": 32, "width_2": 64}
    assert probe_tensors({"emb_params": (4, 768)}).base is Base.SD1
    assert probe_tensors({"<cat-toy>": (1, 1024)}).base is Base.SD2


def test_hypernetwork(files, tmp_path: Path):
    info = probe(networks.write_hypernetwork(tmp_path / "h.pt", files.pipeline("sd15"), layer_structure=(1, 2, 1)))
    assert info.type is ModelType.HYPERNETWORK
    assert info.details["dims"] == (32, 64) and info.details["layer_structure"] == (1, 2, 1)
    assert info.details["activation"] == "relu"


def test_old_hypernetwork_without_options(tmp_path: Path):
    """2022 files: only {width: (k, v)} with linear1/linear2 keys, no layer_structure."""
    module = {"linear1.weight": torch.zeros(1536, 768), "linear1.bias": torch.zeros(1536),
              "linear2.weight": torch.zeros(768, 1536), "linear2.bias": torch.zeros(768)}
    path = tmp_path / "anime.pt"
    torch.save({768: (module, module), 320: (module, module)}, path)
    info = probe(path)
    assert info.type is ModelType.HYPERNETWORK and info.base is Base.SD1 and info.details["dims"] == (320, 768)


def test_vae_files(tmp_path: Path):
    for fmt in ("safetensors", "ckpt"):
        info = probe(networks.write_vae(tmp_path / f"v.{fmt}", fmt=fmt))
        assert info.type is ModelType.VAE and info.details["naming"] == "ldm" and info.details["latent_channels"] == 4
    from tests.tiny.models import tiny_vae

    path = tmp_path / "diffusers_vae.safetensors"
    save_file(tiny_vae().state_dict(), str(path))
    assert probe(path).details["naming"] == "diffusers"


def test_controlnets(files, tmp_path: Path):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(files.pipeline("sd15").unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    info = probe(ldm.write_controlnet(tmp_path / "cn.safetensors", controlnet))
    assert info.type is ModelType.CONTROLNET and info.details["naming"] == "ldm" and info.details["hint_channels"] == 3
    single = tmp_path / "cn_diffusers.safetensors"
    save_file(controlnet.state_dict(), str(single))
    assert probe(single).details["naming"] == "diffusers"
    controlnet.save_pretrained(tmp_path / "cn_folder")
    assert probe(tmp_path / "cn_folder").type is ModelType.CONTROLNET
    xl = ControlNetModel.from_unet(files.pipeline("sdxl").unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    assert probe_tensors({k: tuple(v.shape) for k, v in xl.state_dict().items()}).base is Base.SDXL


def test_unknown_and_unsupported(tmp_path: Path):
    with pytest.raises(UnknownModelTypeError, match="first keys: bert.embeddings"):
        probe_tensors({"bert.embeddings.weight": (10, 10)}, source="bert.safetensors")
    with pytest.raises(UnknownModelTypeError, match="Flux"):
        probe_tensors({"double_blocks.0.img_attn.qkv.weight": (9, 3)})
    with pytest.raises(ModelFormatError, match="no tensors"):
        probe_tensors({})
    path = tmp_path / "notes.pt"
    torch.save({"notes": "hello"}, path)
    with pytest.raises(ModelFormatError, match="no tensors"):
        probe(path)


def test_shipped_skeleton_layouts_are_recognised():
    """LDM layouts of the real architectures (built on the meta device) probe as their base."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from pipelines.skeletons import SHIPPED_ROOT
    from tests.tiny.fixtures import meta_components

    expected = {"sd15": (Base.SD1, "v1"), "sd15-inpaint": (Base.SD1, "inpainting"),
                "sdxl-base": (Base.SDXL, "xl_base"), "sdxl-inpaint": (Base.SDXL, "xl_inpaint"),
                "sdxl-refiner": (Base.SDXL_REFINER, "xl_refiner")}
    for name, (base, diffusers_type) in expected.items():
        state = ldm.pipeline_to_ldm(meta_components(SHIPPED_ROOT / name))
        info = probe_tensors({k: tuple(v.shape) for k, v in state.items()})
        assert info.base is base and info.inpaint is ("inpaint" in name), name
        assert infer_diffusers_model_type(state) == diffusers_type, name
