"""training.export / training.metadata: kohya LoRA files from peft adapters, checked against our engine's
loader, a hand merge of the kohya definition, LDM module names and sd-scripts' hash algorithm."""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from pipelines.hashes import hash_file
from pipelines.networks.lora import LoraManager, lora_family
from pipelines.prompts import LoraCall
from pipelines.types import ModelRef
from tests.tiny import ldm
from tests.tiny.fixtures import build_pipeline, tiny_files
from tests.tiny.networks import _te_targets, _unet_targets, merged_copy
from training.export import save_lora, text_encoder_lora_targets, unet_lora_targets
from training.metadata import RunFacts, base_model_hashes, build_metadata, sshs_hashes, summary

RANK, ALPHA = 4, 2.0


def _facts(base: str, **kw) -> RunFacts:
    return RunFacts(
        base_type=base, output_name="mylora", network_dim=RANK, network_alpha=ALPHA,
        resolution=(1024, 1024) if base == "sdxl" else (512, 512), num_epochs=3, epoch=1, steps=40,
        max_train_steps=120, num_train_images=40, num_batches_per_epoch=40, seed=1337,
        tag_frequency={"10_cat": {"cat": 4, "red hat": 2}}, dataset_dirs={"10_cat": {"n_repeats": 10, "img_count": 4}},
        sd_model_name="tiny.safetensors", sd_model_hash="0123abcd", new_sd_model_hash="f" * 64,
        training_started_at=1_700_000_000.5, **kw,
    )


def _adapted(base: str):
    """A fresh tiny pipeline of `base` with trained-looking (non-zero) peft LoRA adapters."""
    from peft import LoraConfig

    pipe = build_pipeline(base, tiny_files().tokenizer_dir)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                     target_modules=unet_lora_targets(base)))
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if base == "sdxl" else [])
    for encoder in encoders:
        encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                       target_modules=text_encoder_lora_targets()))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # peft starts B at zero: make the LoRA do something
        for model in [pipe.unet, *encoders]:
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return pipe, encoders


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def exported(request, tmp_path_factory):
    base = request.param
    pipe, encoders = _adapted(base)
    path = tmp_path_factory.mktemp(base) / "mylora.safetensors"
    meta = save_lora(path, unet=pipe.unet, text_encoders=encoders, base=base, network_alpha=ALPHA,
                     metadata=build_metadata(_facts(base)))
    return base, pipe, path, meta


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


def _unet_inputs(base: str):
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    if base == "sdxl":
        hidden = torch.randn(1, 8, 96, generator=g)
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 64, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    else:
        hidden, extra = torch.randn(1, 8, 32, generator=g), {}
    return sample, hidden, extra


@torch.no_grad()
def _outputs(pipe, base: str) -> list[torch.Tensor]:
    sample, hidden, extra = _unet_inputs(base)
    outs = [pipe.unet(sample, 10, encoder_hidden_states=hidden, **extra).sample]
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 2]])
    for encoder in [pipe.text_encoder] + ([pipe.text_encoder_2] if base == "sdxl" else []):
        outs.append(encoder(ids).last_hidden_state)
    return outs


def test_keys_are_kohya_names_of_real_modules_fp16_with_alpha(exported):
    base, pipe, path, _ = exported
    tensors, _ = _tensors(path)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    modules = {k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")}
    for m in modules:
        assert tensors[f"{m}.lora_down.weight"].shape[0] == RANK
        assert tensors[f"{m}.lora_up.weight"].shape[1] == RANK
        assert float(tensors[f"{m}.alpha"]) == ALPHA
    assert len(tensors) == 3 * len(modules)
    unet = {m for m in modules if m.startswith("lora_unet_")}
    fresh = build_pipeline(base, tiny_files().tokenizer_dir)
    # the layers kohya's networks.lora trains (tests/tiny/networks.py), no more, no less
    assert len(unet) == len(_unet_targets(fresh.unet, conv=False))
    if base == "sdxl":
        # sd-scripts' SGM names: every module is a real weight of the LDM (single-file) UNet
        ldm_modules = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_")
                       for k in ldm.unet_to_ldm(fresh.unet) if k.endswith(".weight")}
        assert unet <= ldm_modules
        assert any("input_blocks_3_1_transformer_blocks_1_attn2_to_k" in m for m in unet)
        assert not any("down_blocks" in m or "up_blocks" in m for m in unet)
        te = {"lora_te1_": fresh.text_encoder, "lora_te2_": fresh.text_encoder_2}
    else:
        diffusers_modules = {"lora_unet_" + n.replace(".", "_") for n, _ in fresh.unet.named_modules()}
        assert unet <= diffusers_modules
        assert "lora_unet_down_blocks_1_attentions_0_proj_in" in unet  # 1x1 conv in SD1.5
        te = {"lora_te_": fresh.text_encoder}
    for prefix, encoder in te.items():
        names = {m for m in modules if m.startswith(prefix)}
        assert len(names) == len(_te_targets(encoder)) > 0
        assert f"{prefix}text_model_encoder_layers_0_self_attn_q_proj" in names
    assert not any(m.startswith(("lora_te1_", "lora_te2_")) for m in modules) or base == "sdxl"
    assert lora_family(tensors, {}) == ("sdxl" if base == "sdxl" else None)


def test_our_loader_reproduces_the_peft_model(exported):
    base, pipe, path, meta = exported
    fresh = build_pipeline(base, tiny_files().tokenizer_dir)
    before = _outputs(fresh, base)
    expected = _outputs(pipe, base)
    warnings: list[str] = []
    manager = LoraManager()
    applied = manager.apply(fresh, [(LoraCall("mylora"), ModelRef("mylora", path, "a" * 64, "lora"))], warnings)
    assert warnings == [] and len(applied) == 1
    got = _outputs(fresh, base)
    for b, e, g in zip(before, expected, got, strict=True):
        assert (e - b).abs().max() > 0.1  # the LoRA changes every component (by 0.5..3 here)
        assert torch.allclose(g, e, atol=2e-3, rtol=1e-2), (g - e).abs().max()
    # and the kohya definition merged by hand (W += alpha/rank * up @ down) agrees
    merged = _outputs(merged_copy(build_pipeline(base, tiny_files().tokenizer_dir), path), base)
    for e, m in zip(expected, merged, strict=True):
        assert torch.allclose(m, e, atol=2e-3, rtol=1e-2)
    manager.deactivate(fresh)
    for b, a in zip(before, _outputs(fresh, base), strict=True):
        assert torch.equal(a, b)


def test_fp32_export_is_exact_up_to_float_rounding(tmp_path):
    """Without fp16 rounding the loaded file equals the peft model closely: names, alpha and scale are right."""
    pipe, encoders = _adapted("sdxl")
    path = tmp_path / "fp32.safetensors"
    save_lora(path, unet=pipe.unet, text_encoders=encoders, base="sdxl", network_alpha=ALPHA, metadata={},
              dtype=torch.float32)
    fresh = build_pipeline("sdxl", tiny_files().tokenizer_dir)
    LoraManager().apply(fresh, [(LoraCall("x"), ModelRef("x", path, "b" * 64, "lora"))], [])
    for g, e in zip(_outputs(fresh, "sdxl"), _outputs(pipe, "sdxl"), strict=True):
        assert torch.allclose(g, e, atol=2e-5, rtol=1e-5), (g - e).abs().max()


def test_metadata_and_hashes_in_the_file(exported, tmp_path):
    base, _, path, meta = exported
    tensors, header = _tensors(path)
    assert header == meta and all(isinstance(v, str) for v in header.values())
    assert not list(path.parent.glob("*.partial"))
    # sd-scripts: hash a re-serialisation holding only the ss_* metadata
    blob = save(tensors, metadata={k: v for k, v in header.items() if k.startswith("ss_")})
    (n,) = struct.unpack("<Q", blob[:8])
    assert header["sshs_model_hash"] == hashlib.sha256(blob[8 + n:]).hexdigest()
    assert header["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    # the tensor data is metadata-independent, so A1111's AutoV3 of the file agrees
    assert hash_file(path).data_sha256 == header["sshs_model_hash"]
    assert header["ss_base_model_version"] == ("sdxl_base_v1-0" if base == "sdxl" else "sd_v1")
    assert header["ss_network_alpha"] == str(ALPHA) and header["ss_network_dim"] == str(RANK)
    info = summary(path)
    assert info["base"] == base and info["network_dim"] == RANK and info["network_alpha"] == ALPHA
    assert info["epoch"] == 1 and info["steps"] == 40 and info["model_hash"] == header["sshs_model_hash"]
    assert info["top_tags"][0] == ("cat", 4) and info["title"] == "mylora"
    assert info["modules"] == sum(1 for k in tensors if k.endswith(".lora_down.weight"))


def test_sshs_hashes_legacy_reads_the_64k_at_1mib_and_ignores_other_metadata():
    tensors = {"a.lora_down.weight": torch.arange(600_000, dtype=torch.float32).reshape(1000, 600)}
    one = sshs_hashes(tensors, {"ss_network_dim": "4", "modelspec.title": "x"})
    two = sshs_hashes(tensors, {"ss_network_dim": "4", "modelspec.title": "renamed"})
    other = sshs_hashes(tensors, {"ss_network_dim": "4", "ss_training_comment": "x" * 101})
    assert one == two and one["sshs_legacy_hash"] != other["sshs_legacy_hash"]
    blob = save(tensors, metadata={"ss_network_dim": "4"})
    assert len(blob) > 0x110000
    assert one["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    assert len(one["sshs_model_hash"]) == 64


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_build_metadata_has_kohya_keys(base):
    meta = build_metadata(_facts(base, saved_at=1_700_000_100.0))
    assert all(isinstance(v, str) for v in meta.values())
    for key in ("ss_session_id", "ss_training_started_at", "ss_training_finished_at", "ss_output_name",
                "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_num_train_images", "ss_num_epochs",
                "ss_epoch", "ss_steps", "ss_max_train_steps", "ss_lr_scheduler", "ss_optimizer", "ss_seed",
                "ss_mixed_precision", "ss_v2", "ss_clip_skip", "ss_cache_latents", "ss_resolution",
                "ss_batch_size_per_device", "ss_total_batch_size", "ss_enable_bucket", "ss_min_bucket_reso",
                "ss_max_bucket_reso", "ss_flip_aug", "ss_shuffle_caption", "ss_keep_tokens", "ss_dataset_dirs",
                "ss_reg_dataset_dirs", "ss_tag_frequency", "ss_sd_model_name", "ss_sd_model_hash",
                "ss_new_sd_model_hash", "ss_max_grad_norm", "ss_gradient_checkpointing"):
        assert key in meta, key
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if base == "sdxl" else "sd_v1")
    assert meta["ss_v2"] == "False"
    assert meta["ss_num_epochs"] == "3" and meta["ss_steps"] == "40" and meta["ss_epoch"] == "1"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_cat": {"cat": 4, "red hat": 2}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_cat": {"n_repeats": 10, "img_count": 4}}
    assert meta["ss_sd_model_hash"] == "0123abcd" and meta["ss_new_sd_model_hash"] == "f" * 64
    assert float(meta["ss_training_started_at"]) == 1_700_000_000.5
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == ("stable-diffusion-xl-v1-base/lora" if base == "sdxl"
                                              else "stable-diffusion-v1/lora")
    assert meta["modelspec.title"] == "mylora" and meta["modelspec.prediction_type"] == "epsilon"
    assert "modelspec.encoder_layer" not in meta
    assert build_metadata(_facts(base, clip_skip=2))["modelspec.encoder_layer"] == "2"
    assert meta["modelspec.resolution"] == ("1024x1024" if base == "sdxl" else "512x512")
    assert meta["modelspec.date"] == "2023-11-14T22:15:00+00:00"
    assert float(meta["ss_training_finished_at"]) == 1_700_000_100.0
    assert meta["ss_resolution"] == ("(1024, 1024)" if base == "sdxl" else "(512, 512)")
    now = float(build_metadata(_facts(base))["ss_training_finished_at"])
    assert abs(now - time.time()) < 60


def test_base_model_hashes_match_a1111(tmp_path):
    ckpt = tiny_files().checkpoint("sd15")
    old, new = base_model_hashes(ckpt)
    with ckpt.open("rb") as f:
        data = f.read()
    assert new == hashlib.sha256(data).hexdigest()
    assert old == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert base_model_hashes(tmp_path) == (None, None)


def test_bad_inputs_are_refused_and_leave_no_file(tmp_path):
    pipe, encoders = _adapted("sd15")
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="ss_steps"):
        save_lora(path, unet=pipe.unet, text_encoders=encoders, base="sd15", network_alpha=ALPHA,
                  metadata={"ss_steps": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="network_alpha"):
        save_lora(path, unet=pipe.unet, text_encoders=encoders, base="sd15", network_alpha=8.0, metadata={})
    with pytest.raises(ValueError, match="base"):
        save_lora(path, unet=pipe.unet, text_encoders=encoders, base="sd2", network_alpha=ALPHA, metadata={})
    with pytest.raises(ValueError, match="no peft LoRA adapter"):
        save_lora(path, unet=copy.deepcopy(build_pipeline("sd15", tiny_files().tokenizer_dir).unet),
                  text_encoders=[], base="sd15", network_alpha=ALPHA, metadata={})
    assert list(tmp_path.iterdir()) == []


def test_unet_only_lora(tmp_path):
    pipe, _ = _adapted("sd15")
    path = tmp_path / "u.safetensors"
    save_lora(path, unet=pipe.unet, text_encoders=[], base="sd15", network_alpha=ALPHA, metadata={})
    tensors, meta = _tensors(path)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert set(meta) == {"sshs_model_hash", "sshs_legacy_hash"}
