"""training.config: kohya keys in, typed config out, every bad key named."""

from __future__ import annotations

import json

import pytest

from training.config import (
    IGNORED_KEYS,
    ConfigError,
    SamplePrompt,
    TrainingConfig,
    default_config,
    format_config,
    parse_config,
)


def test_defaults_per_base() -> None:
    sd15 = default_config("sd15")
    sdxl = default_config("sdxl")
    assert sd15["resolution"] == 512 and sd15["clip_skip"] == 1
    assert sdxl["resolution"] == 1024 and "clip_skip" not in sdxl
    for d in (sd15, sdxl):
        assert d["network_dim"] == 32 and d["network_alpha"] == 16
        assert d["unet_lr"] == 1e-4 and d["text_encoder_lr"] == 1e-5
        assert d["max_train_epochs"] == 10 and d["train_batch_size"] == 1
        assert (d["min_bucket_reso"], d["max_bucket_reso"], d["bucket_reso_steps"]) == (256, 1024, 64)
        assert d["enable_bucket"] is True and d["cache_latents"] is True
        assert d["gradient_checkpointing"] is False and d["mixed_precision"] == "fp16"
        assert d["seed"] == 1337 and d["save_every_n_epochs"] == 1
        assert d["lr_scheduler"] == "constant" and d["optimizer_type"] == "AdamW"
        assert d["max_grad_norm"] == 1.0 and d["output_name"] == "lora"
    sd15["network_dim"] = 4  # an editable copy
    assert default_config("sd15")["network_dim"] == 32


def test_empty_config_is_the_defaults() -> None:
    config = parse_config({}, base_type="sdxl")
    assert config == parse_config(default_config("sdxl"), base_type="sdxl")
    assert config.resolution == (1024, 1024) and config.clip_skip is None
    assert parse_config({}, base_type="sd15").clip_skip == 1


def test_unknown_base_type() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({}, base_type="sd3")
    assert err.value.field == "base_type"


def test_sdxl_rejects_clip_skip() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"clip_skip": 2}, base_type="sdxl")
    assert err.value.field == "clip_skip" and "SD1.5" in err.value.message
    assert parse_config({"clip_skip": 2}, base_type="sd15").clip_skip == 2


def test_unknown_keys_are_all_named() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"network_dim": 8, "netwrok_alpha": 4, "lerning_rate": 1e-4}, base_type="sd15")
    assert err.value.fields == ["netwrok_alpha", "lerning_rate"]
    assert err.value.field == "netwrok_alpha"
    assert "netwrok_alpha" in err.value.message and "lerning_rate" in err.value.message


def test_bad_types_and_ranges_are_named() -> None:
    raw = {"network_dim": "wide", "train_batch_size": 0, "mixed_precision": "fp8", "enable_bucket": "yes",
           "resolution": "500", "unet_lr": -1, "lr_scheduler": "polynomial", "output_name": "../x",
           "caption_extension": "txt", "seed": 1.5}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_type="sd15")
    assert err.value.fields == list(raw)
    assert "fp8" in err.value.message and "multiple of 8" in err.value.message


def test_bucket_range_must_hold_the_resolution() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"resolution": 1024, "max_bucket_reso": 768}, base_type="sd15")
    assert err.value.field == "resolution"
    parse_config({"resolution": 1024, "max_bucket_reso": 768, "enable_bucket": False}, base_type="sd15")


def test_run_file_keys_are_refused() -> None:
    raw = {"pretrained_model_name_or_path": "/m.safetensors", "train_data_dir": "/d", "output_dir": "/o"}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_type="sd15")
    assert err.value.fields == list(raw)
    assert "set by the studio" in err.value.message


def test_ignored_keys_warn() -> None:
    assert {"xformers", "logging_dir", "persistent_data_loader_workers"} <= IGNORED_KEYS
    config = parse_config({"xformers": True, "logging_dir": "/logs"}, base_type="sd15")
    assert any("xformers" in w for w in config.warnings) and any("logging_dir" in w for w in config.warnings)


def test_toml_text_with_kohya_sections() -> None:
    text = """
    [model_arguments]
    v2 = false
    [additional_network_arguments]
    network_dim = 16
    network_alpha = 8
    network_module = "networks.lora"
    [optimizer_arguments]
    learning_rate = 0.0002
    lr_scheduler = "cosine"
    [dataset_arguments]
    resolution = "512,768"
    """
    with pytest.raises(ConfigError) as err:  # v2 is not ours: named, not silently dropped
        parse_config(text, base_type="sd15")
    assert err.value.fields == ["v2"]
    config = parse_config(text.replace("v2 = false", ""), base_type="sd15")
    assert (config.network_dim, config.network_alpha, config.lr_scheduler) == (16, 8.0, "cosine")
    assert config.resolution == (512, 768)
    # learning_rate fills unet_lr and text_encoder_lr when they are not given (kohya's rule).
    assert config.unet_lr == config.text_encoder_lr == 2e-4


def test_json_text_and_syntax_errors() -> None:
    config = parse_config('{"network_dim": 4, "max_train_epochs": 2}', base_type="sdxl")
    assert (config.network_dim, config.max_train_epochs) == (4, 2)
    with pytest.raises(ConfigError) as err:
        parse_config("network_dim = ", base_type="sd15")
    assert "TOML" in err.value.message and err.value.field is None
    with pytest.raises(ConfigError) as err:
        parse_config("{nope", base_type="sd15", fmt="json")
    assert "JSON" in err.value.message


def test_round_trip() -> None:
    raw = {"network_dim": 8, "resolution": "640,512", "sample_prompts": ["a cat --n dog --w 512 --h 640 --d 3"],
           "sample_every_n_epochs": 2, "max_train_steps": 100, "text_encoder_lr": 0, "mixed_precision": "BF16"}
    config = parse_config(raw, base_type="sd15")
    again = parse_config(json.loads(json.dumps(config.to_dict())), base_type="sd15")
    assert again == config
    text, warnings = format_config(raw, base_type="sd15")
    assert warnings == []
    assert parse_config(text, base_type="sd15") == config
    assert 'resolution = "640,512"' in text and 'mixed_precision = "bf16"' in text


def test_format_config_reports_warnings_and_errors() -> None:
    text, warnings = format_config("xformers = true\nnetwork_dim = 4\n", base_type="sdxl")
    assert "network_dim = 4" in text and "xformers" not in text and warnings
    with pytest.raises(ConfigError):
        format_config("network_dim = 0", base_type="sdxl")


def test_sample_prompt_flags() -> None:
    config = parse_config({"sample_prompts": "# comment\n\na red cube --n blurry, dark --w 64 --h 128 --d 7 --s 4 --l 5.5\n"
                                             "plain prompt --ss euler_a\n"},
                          base_type="sd15")
    first, second = config.sample_prompts
    assert first == SamplePrompt(prompt="a red cube", negative_prompt="blurry, dark", width=64, height=128,
                                 seed=7, steps=4, guidance_scale=5.5)
    assert second.prompt == "plain prompt" and second.width is None and second.steps == 20
    with pytest.raises(ConfigError) as err:
        parse_config({"sample_prompts": ["a cat --q 3"]}, base_type="sd15")
    assert err.value.field == "sample_prompts" and "--q" in err.value.message
    with pytest.raises(ConfigError) as err:
        parse_config({"sample_prompts": ["a cat --w big"]}, base_type="sd15")
    assert err.value.field == "sample_prompts"


def test_sampling_needs_prompts() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"sample_every_n_epochs": 1}, base_type="sd15")
    assert err.value.field == "sample_prompts"


def test_config_is_typed() -> None:
    config = parse_config({"network_alpha": 4, "seed": "42", "flip_aug": "true"}, base_type="sd15")
    assert isinstance(config, TrainingConfig)
    assert config.network_alpha == 4.0 and isinstance(config.network_alpha, float)
    assert config.seed == 42 and config.flip_aug is True
    assert config.train_text_encoder
    assert not parse_config({"network_train_unet_only": True}, base_type="sd15").train_text_encoder
