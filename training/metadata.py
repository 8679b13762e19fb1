"""The header metadata of a trained LoRA, as kohya sd-scripts writes it, and reading it back.

``build_metadata`` turns what the trainer knows (``RunFacts``) into sd-scripts' ``ss_*`` keys (the set
written without a dataset config; every value a string, JSON where sd-scripts writes JSON) and the SAI
model-spec ``modelspec.*`` keys. A1111 and Civitai read these: A1111 tells SDXL from SD1 LoRAs by
``ss_base_model_version`` and shows tag frequencies and training settings. ``sshs_hashes`` computes
sd-scripts' hashes, which survive later edits of non-``ss_`` metadata. ``summary`` reads a file's
metadata back for the UI.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines.hashes import LEGACY_LENGTH, LEGACY_OFFSET, legacy_hash, sha256_file

BASE_MODEL_VERSIONS = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURES = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
# sd-scripts' sai_model_spec: SDXL points at Stability's reference code, SD1.x at diffusers
IMPLEMENTATIONS = {"sd15": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}
NETWORK_MODULE = "networks.lora"
MODELSPEC_VERSION = "1.0.0"
OPTIMIZERS = {"adamw": "torch.optim.adamw.AdamW", "adam": "torch.optim.adam.Adam", "sgd": "torch.optim.sgd.SGD"}


@dataclass
class RunFacts:
    """What the trainer knows about a run when it saves a LoRA (one instance, updated per save).

    ``tag_frequency`` is ``{dataset folder: {tag: count}}`` and ``dataset_dirs`` is
    ``{dataset folder: {"n_repeats": r, "img_count": n}}`` as sd-scripts records them (folder names,
    never absolute paths). ``sd_model_hash`` / ``new_sd_model_hash`` come from ``base_model_hashes``.
    """

    base_type: str  # "sd15" | "sdxl"
    output_name: str
    network_dim: int
    network_alpha: float
    resolution: tuple[int, int]  # (width, height)
    num_epochs: int
    epoch: int = 0  # epochs finished when saving
    steps: int = 0  # optimiser steps done when saving
    max_train_steps: int = 0
    num_train_images: int = 0  # images x repeats
    num_reg_images: int = 0
    num_batches_per_epoch: int = 0
    train_batch_size: int = 1
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    network_train_unet_only: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "AdamW"
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = False
    seed: int | None = None
    clip_skip: int | None = None
    noise_offset: float | None = None
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_info: Mapping[str, Any] | None = None
    flip_aug: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    tag_frequency: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    dataset_dirs: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    sd_model_name: str = ""
    sd_model_hash: str | None = None
    new_sd_model_hash: str | None = None
    training_comment: str | None = None
    training_started_at: float = field(default_factory=time.time)
    saved_at: float | None = None  # ss_training_finished_at and modelspec.date (sd-scripts: time of the save); None = now
    session_id: int = field(default_factory=lambda: random.randint(0, 2**32))
    title: str | None = None  # modelspec.title; output_name when None

    def __post_init__(self) -> None:
        if self.base_type not in BASE_MODEL_VERSIONS:
            raise ValueError(f"`base_type` must be one of {tuple(BASE_MODEL_VERSIONS)}, got {self.base_type!r}")


def base_model_hashes(path: Path | str) -> tuple[str | None, str | None]:
    """(ss_sd_model_hash, ss_new_sd_model_hash) of a base model: A1111's old 8-hex hash and the file sha256.

    A diffusers folder has neither (None, None).
    """
    path = Path(path)
    if not path.is_file():
        return None, None
    return legacy_hash(path), sha256_file(path)


def _optimizer_name(name: str) -> str:
    return OPTIMIZERS.get(name.lower(), name)


def build_metadata(facts: RunFacts) -> dict[str, str]:
    """sd-scripts' ``ss_*`` keys and ``modelspec.*`` keys for a LoRA saved now, all values strings."""
    width, height = facts.resolution
    unet_lr = facts.unet_lr if facts.unet_lr is not None else facts.learning_rate
    te_lr = facts.text_encoder_lr if facts.text_encoder_lr is not None else facts.learning_rate
    values: dict[str, Any] = {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.training_started_at,
        "ss_output_name": facts.output_name,
        "ss_learning_rate": facts.learning_rate,
        "ss_text_encoder_lr": None if facts.network_train_unet_only else te_lr,
        "ss_unet_lr": unet_lr,
        "ss_num_train_images": facts.num_train_images,
        "ss_num_reg_images": facts.num_reg_images,
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_epoch": facts.epoch,
        "ss_steps": facts.steps,
        "ss_gradient_checkpointing": facts.gradient_checkpointing,
        "ss_gradient_accumulation_steps": 1,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_lr_warmup_steps": facts.lr_warmup_steps,
        "ss_lr_scheduler": facts.lr_scheduler,
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": facts.network_dim,
        "ss_network_alpha": float(facts.network_alpha),
        "ss_network_dropout": None,
        "ss_network_args": None,
        "ss_mixed_precision": facts.mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": False,
        "ss_base_model_version": BASE_MODEL_VERSIONS[facts.base_type],
        "ss_clip_skip": facts.clip_skip,
        "ss_max_token_length": None,
        "ss_cache_latents": facts.cache_latents,
        "ss_seed": facts.seed,
        "ss_noise_offset": facts.noise_offset,
        "ss_training_comment": facts.training_comment,
        "ss_optimizer": _optimizer_name(facts.optimizer),
        "ss_max_grad_norm": facts.max_grad_norm,
        "ss_caption_dropout_rate": 0.0,
        "ss_caption_dropout_every_n_epochs": 0,
        "ss_caption_tag_dropout_rate": 0.0,
        "ss_prior_loss_weight": 1.0,
        "ss_min_snr_gamma": None,
        # written without a dataset config (one dataset, flags from the command line)
        "ss_batch_size_per_device": facts.train_batch_size,
        "ss_total_batch_size": facts.train_batch_size,
        "ss_resolution": f"({width}, {height})",
        "ss_color_aug": False,
        "ss_flip_aug": facts.flip_aug,
        "ss_random_crop": False,
        "ss_shuffle_caption": facts.shuffle_caption,
        "ss_keep_tokens": facts.keep_tokens,
        "ss_enable_bucket": facts.enable_bucket,
        "ss_bucket_no_upscale": False,
        "ss_min_bucket_reso": facts.min_bucket_reso,
        "ss_max_bucket_reso": facts.max_bucket_reso,
        "ss_bucket_info": json.dumps(dict(facts.bucket_info)) if facts.bucket_info is not None else None,
        "ss_dataset_dirs": json.dumps({k: dict(v) for k, v in facts.dataset_dirs.items()}),
        "ss_reg_dataset_dirs": json.dumps({}),
        "ss_tag_frequency": json.dumps({k: dict(v) for k, v in facts.tag_frequency.items()}),
        "ss_sd_model_name": facts.sd_model_name,
    }
    if facts.sd_model_hash is not None:
        values["ss_sd_model_hash"] = facts.sd_model_hash
    if facts.new_sd_model_hash is not None:
        values["ss_new_sd_model_hash"] = facts.new_sd_model_hash
    saved_at = facts.saved_at if facts.saved_at is not None else time.time()
    values["ss_training_finished_at"] = saved_at
    metadata = {k: str(v) for k, v in values.items()}  # sd-scripts writes str(None) == "None" too
    saved = dt.datetime.fromtimestamp(saved_at, dt.UTC)
    metadata |= {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": ARCHITECTURES[facts.base_type],
        "modelspec.implementation": IMPLEMENTATIONS[facts.base_type],
        "modelspec.title": facts.title or facts.output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": saved.replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "epsilon",
    }
    if facts.clip_skip is not None:
        metadata["modelspec.encoder_layer"] = str(facts.clip_skip)
    return metadata


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """sd-scripts' ``sshs_model_hash`` and ``sshs_legacy_hash``.

    Both hash a safetensors serialisation of ``tensors`` with only the ``ss_*`` metadata (so editing
    other metadata later does not change them): the model hash is the sha256 of the bytes after the
    header; the legacy hash is 8 hex of the sha256 of 64 KiB at 1 MiB.
    """
    from safetensors.torch import save

    blob = save(dict(tensors), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    (header,) = struct.unpack("<Q", blob[:8])
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + header:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8],
    }


def _number(value: str | None, kind: type) -> Any:
    try:
        return kind(value) if value not in (None, "None", "") else None
    except ValueError:
        return None


def summary(path: Path | str, *, top_tags: int = 20) -> dict[str, Any]:
    """What the UI shows about a LoRA file: base, rank/alpha, epoch/steps, title, top tags, hashes.

    Works for LoRAs from other trainers too: missing keys come back as None. ``metadata`` holds the
    whole header metadata.
    """
    from pipelines.safe_files import read_safetensors_header

    path = Path(path)
    header = read_safetensors_header(path)
    meta = dict(header.metadata)
    version = meta.get("ss_base_model_version", "")
    base = "sdxl" if version.startswith("sdxl") else "sd15" if version.startswith("sd_v1") else None
    tags: dict[str, int] = {}
    try:
        for folder in json.loads(meta.get("ss_tag_frequency") or "{}").values():
            for tag, count in folder.items():
                tags[tag] = tags.get(tag, 0) + int(count)
    except (ValueError, AttributeError, TypeError):
        tags = {}
    return {
        "file": path.name,
        "size_bytes": header.file_size,
        "base": base,
        "base_model_version": version or None,
        "output_name": meta.get("ss_output_name"),
        "title": meta.get("modelspec.title"),
        "architecture": meta.get("modelspec.architecture"),
        "resolution": meta.get("modelspec.resolution"),
        "date": meta.get("modelspec.date"),
        "network_dim": _number(meta.get("ss_network_dim"), int),
        "network_alpha": _number(meta.get("ss_network_alpha"), float),
        "epoch": _number(meta.get("ss_epoch"), int),
        "num_epochs": _number(meta.get("ss_num_epochs"), int),
        "steps": _number(meta.get("ss_steps"), int),
        "base_model_name": meta.get("ss_sd_model_name"),
        "base_model_hash": meta.get("ss_new_sd_model_hash") or meta.get("ss_sd_model_hash"),
        "model_hash": meta.get("sshs_model_hash"),
        "top_tags": sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:top_tags],
        "modules": sum(1 for k in header.tensors if k.endswith(".lora_down.weight")),
        "metadata": meta,
    }
