"""Regenerate assets/skeletons: the CLIP BPE vocabulary and config skeletons for real model families.

The product runs air-gapped, so everything diffusers would fetch from the Hub for a single-file
checkpoint ships in the repository. Sources:

* CLIP's BPE merges from the open-clip-torch wheel (MIT; the data is OpenAI CLIP's, MIT), found via
  `--bpe FILE`, `--wheel FILE.whl`, an installed `open_clip`, or `pip download --no-deps`.
* Configs: the published values of SD1.5, SD1.5-inpainting, SDXL base/inpainting and the SDXL refiner
  (sgm yaml: model_channels 384, channel_mult [1, 2, 4, 4], num_head_channels 64, transformer depth
  4, context 1280, adm_in_channels 2560). Each skeleton is written from a meta-device pipeline by
  `pipelines.skeletons.write_skeleton`, the same writer tests use for tiny skeletons.
* ControlNet configs (one `config.json` per family): lllyasviel/control_v11p_sd15_* (the SD1.5 UNet's
  encoder half plus a 16-32-96-256 hint encoder) and diffusers/controlnet-canny-sdxl-1.0 (the SDXL
  UNet's encoder half, text_time embedding). Written from meta-device `ControlNetModel`s.

Usage: python scripts/make_assets.py [--wheel PATH | --bpe PATH] [--out assets/skeletons]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

logger = logging.getLogger("make_assets")

BPE_NAME = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2
CHECK_PROMPT = "a photo of a cat, masterpiece"
CHECK_IDS = [49406, 320, 1125, 539, 320, 2368, 267, 12066, 49407]
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
         "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}


def _bpe_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(BPE_NAME)


def find_bpe(bpe: Path | None, wheel: Path | None) -> bytes:
    """The gzipped BPE merges file, from the first source that has it."""
    if bpe is not None:
        return bpe.read_bytes()
    if wheel is not None:
        return _bpe_from_wheel(wheel)
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("downloading open-clip-torch==3.3.0 from the package index")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", tmp, "open-clip-torch==3.3.0"],
                       check=True)
        return _bpe_from_wheel(next(Path(tmp).glob("open_clip_torch-*.whl")))


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of GPT-2/CLIP BPE, in CLIP's order:
    printable bytes map to themselves, the others (ascending) to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clip_vocabulary(bpe_gz: bytes) -> tuple[str, str]:
    """vocab.json and merges.txt text: bytes, bytes+</w>, one token per merge, then the two specials."""
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"BPE file has {len(merges)} usable merges, expected {N_MERGES}")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ValueError(f"vocabulary has {len(vocab)} distinct tokens, expected 49408")
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)


def _clip_l() -> dict:
    return {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def _bigg() -> dict:
    return {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
            "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
            "projection_dim": 1280, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def _vae(xl: bool) -> dict:
    return {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "latent_channels": 4,
            "in_channels": 3, "out_channels": 3, "norm_num_groups": 32, "sample_size": 1024 if xl else 512,
            "scaling_factor": 0.13025 if xl else 0.18215, "force_upcast": xl}


def _sd15_unet(in_channels: int) -> dict:
    return {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "in_channels": in_channels,
            "out_channels": 4, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "attention_head_dim": 8,
            "cross_attention_dim": 768, "sample_size": 64}


def _sdxl_unet(in_channels: int) -> dict:
    return {"block_out_channels": [320, 640, 1280], "layers_per_block": 2, "in_channels": in_channels,
            "out_channels": 4, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
            "cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True, "sample_size": 128}


def _refiner_unet() -> dict:
    # sgm sd_xl_refiner.yaml; diffusers' "attention_head_dim" is the head count: channels / 64.
    return {"block_out_channels": [384, 768, 1536, 1536], "layers_per_block": 2, "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [6, 12, 24, 24], "transformer_layers_per_block": 4,
            "cross_attention_dim": 1280, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2560, "use_linear_projection": True, "sample_size": 128}


def build_meta_pipeline(family: str, vocab_dir: Path):
    """A pipeline of `family` with meta-device weights and real tokenizers (configs only, no memory)."""
    import diffusers
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def tokenizer(pad: str = "<|endoftext|>"):
        return CLIPTokenizer(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"),
                             model_max_length=77, pad_token=pad)

    xl = family.startswith("sdxl")
    with init_empty_weights():
        vae = diffusers.AutoencoderKL(**_vae(xl))
        if family in ("sd15", "sd15-inpaint"):
            unet = diffusers.UNet2DConditionModel(**_sd15_unet(9 if family == "sd15-inpaint" else 4))
            te = CLIPTextModel(CLIPTextConfig(**_clip_l()))
            scheduler = diffusers.PNDMScheduler(**BETAS, set_alpha_to_one=False, skip_prk_steps=True)
            cls = diffusers.StableDiffusionInpaintPipeline if family == "sd15-inpaint" else diffusers.StableDiffusionPipeline
            pipe = cls(vae=vae, text_encoder=te, tokenizer=tokenizer(), unet=unet, scheduler=scheduler,
                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            scheduler = diffusers.EulerDiscreteScheduler(**BETAS)
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_bigg()))
            if family == "sdxl-refiner":
                pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
                    vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tokenizer("!"),
                    unet=diffusers.UNet2DConditionModel(**_refiner_unet()), scheduler=scheduler,
                    requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
            else:
                inpaint = family == "sdxl-inpaint"
                cls = diffusers.StableDiffusionXLInpaintPipeline if inpaint else diffusers.StableDiffusionXLPipeline
                pipe = cls(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**_clip_l())), text_encoder_2=te2,
                           tokenizer=tokenizer(), tokenizer_2=tokenizer("!"),
                           unet=diffusers.UNet2DConditionModel(**_sdxl_unet(9 if inpaint else 4)),
                           scheduler=scheduler, force_zeros_for_empty_prompt=True)
    return pipe


FAMILIES = ("sd15", "sd15-inpaint", "sdxl-base", "sdxl-inpaint", "sdxl-refiner")

_CONTROLNET_COMMON = {"conditioning_channels": 3, "conditioning_embedding_out_channels": [16, 32, 96, 256],
                      "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}


def controlnet_configs() -> dict[str, dict]:
    """ControlNet configs by skeleton name: the matching UNet's encoder settings plus the hint encoder."""
    unet_only = ("out_channels", "up_block_types", "sample_size")

    def encoder_half(unet: dict) -> dict:
        return {k: v for k, v in unet.items() if k not in unet_only}

    return {"controlnet-sd15": encoder_half(_sd15_unet(4)) | _CONTROLNET_COMMON,
            "controlnet-sdxl": encoder_half(_sdxl_unet(4)) | _CONTROLNET_COMMON}


def write_controlnet_configs(out: Path) -> None:
    import diffusers
    from accelerate import init_empty_weights

    for name, config in controlnet_configs().items():
        with init_empty_weights():
            model = diffusers.ControlNetModel(**config)
        model.save_config(out / name)
        logger.info("wrote ControlNet config %s", name)


def make_assets(out: Path, bpe_gz: bytes) -> None:
    from transformers import CLIPTokenizer

    from pipelines.skeletons import write_skeleton, write_vocabulary

    vocab_json, merges_txt = clip_vocabulary(bpe_gz)
    vocab_dir = write_vocabulary(out, "clip", vocab_json, merges_txt)
    tokenizer = CLIPTokenizer(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"))
    ids = tokenizer(CHECK_PROMPT).input_ids
    if ids != CHECK_IDS:
        raise SystemExit(f"tokenizer check failed: {CHECK_PROMPT!r} -> {ids}, expected {CHECK_IDS}")
    for family in FAMILIES:
        pipe = build_meta_pipeline("sdxl" if family == "sdxl-base" else family, vocab_dir)
        write_skeleton(pipe, out, family, vocabulary="clip", overwrite=True)
        logger.info("wrote skeleton %s", family)
    write_controlnet_configs(out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--wheel", type=Path, help="an open_clip_torch wheel containing the BPE file")
    parser.add_argument("--out", type=Path, default=REPO / "assets" / "skeletons")
    args = parser.parse_args()
    make_assets(args.out, find_bpe(args.bpe, args.wheel))


if __name__ == "__main__":
    main()
