"""The training config: kohya's key names, typed and checked in one place.

People arrive with kohya_ss / sd-scripts configs, so the keys are kohya's (`network_dim`,
`unet_lr`, `max_train_epochs`, ...) and TOML or JSON text is accepted as pasted. Everything is
checked up front and every bad key is named at once (`ConfigError.fields`), because a training run
that fails an hour in on a typo is the expensive kind of mistake. Keys kohya knows but we have no
use for (`xformers`, `logging_dir`, ...) are accepted with a warning; keys that the studio sets
itself (model path, dataset folder, output folder) are refused here.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

BASE_TYPES = ("sd15", "sdxl")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "cosine", "linear", "constant_with_warmup")
OPTIMIZERS = ("AdamW", "SGD")

#: kohya keys accepted and ignored (reported as warnings): they tune kohya's own machinery.
IGNORED_KEYS = frozenset({
    "xformers", "sdpa", "mem_eff_attn", "logging_dir", "log_prefix", "log_with", "log_tracker_name",
    "persistent_data_loader_workers", "max_data_loader_n_workers", "save_model_as", "save_precision",
    "lowram", "highvram", "cache_latents_to_disk", "vae_batch_size", "sample_sampler", "no_half_vae",
    "max_token_length", "save_state", "save_last_n_epochs", "wandb_api_key", "bucket_no_upscale",
    "lr_scheduler_num_cycles", "lr_scheduler_power", "network_module", "sample_at_first",
})

#: keys that belong to the run file: the studio sets them from the job, never from a pasted config.
RUN_FILE_KEYS = frozenset({
    "pretrained_model_name_or_path", "train_data_dir", "output_dir", "reg_data_dir", "resume",
    "network_weights", "dataset_config", "vae", "state_dir", "base_model",
})

_OUTPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SAMPLE_FLAG = re.compile(r"^(n|w|h|d|s|l|ss)(?:\s+(.*))?$", re.DOTALL)


class ConfigError(ValueError):
    """A bad training config. `field` is the first bad key, `fields` all of them (in order)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = list(problems)
        self.fields = [key for key, _ in problems if key]
        self.field: str | None = self.fields[0] if self.fields else None
        self.message = "; ".join(f"{key}: {why}" if key else why for key, why in problems)
        super().__init__(self.message)


@dataclass(frozen=True)
class SamplePrompt:
    """One sample prompt with kohya's per-line flags (--n --w --h --d --s --l)."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int = 20
    guidance_scale: float = 7.5

    def to_line(self) -> str:
        parts = [self.prompt]
        if self.negative_prompt:
            parts.append(f"--n {self.negative_prompt}")
        if self.width is not None:
            parts.append(f"--w {self.width}")
        if self.height is not None:
            parts.append(f"--h {self.height}")
        if self.seed is not None:
            parts.append(f"--d {self.seed}")
        parts.append(f"--s {self.steps}")
        parts.append(f"--l {_number(self.guidance_scale)}")
        return " ".join(parts)


@dataclass(frozen=True)
class TrainingConfig:
    """A checked training config. Field names are kohya's where kohya has one."""

    base_type: str
    network_dim: int = 32
    network_alpha: float = 16.0
    unet_lr: float = 1e-4
    text_encoder_lr: float = 1e-5
    network_train_unet_only: bool = False
    max_train_epochs: int = 10
    max_train_steps: int | None = None
    train_batch_size: int = 1
    resolution: tuple[int, int] = (512, 512)  # (width, height), as kohya's "W,H"
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    cache_latents: bool = True
    gradient_checkpointing: bool = False
    mixed_precision: str = "fp16"
    seed: int = 1337
    save_every_n_epochs: int = 1
    sample_prompts: tuple[SamplePrompt, ...] = ()
    sample_every_n_epochs: int = 0
    clip_skip: int | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer_type: str = "AdamW"
    max_grad_norm: float = 1.0
    output_name: str = "lora"
    noise_offset: float = 0.0
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    flip_aug: bool = False
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def train_text_encoder(self) -> bool:
        return not self.network_train_unet_only and self.text_encoder_lr > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe kohya-keyed dict that `parse_config(..., base_type=self.base_type)` reads back."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("base_type", "warnings"):
                continue
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "resolution":
                w, h = value
                value = w if w == h else f"{w},{h}"
            elif f.name == "sample_prompts":
                value = [p.to_line() for p in value]
            out[f.name] = value
        return out


_DEFAULTS: dict[str, dict[str, Any]] = {
    base: {k: v for k, v in TrainingConfig(base_type=base).to_dict().items()} for base in BASE_TYPES
}
_DEFAULTS["sd15"].update(resolution=512, clip_skip=1)
_DEFAULTS["sdxl"].update(resolution=1024)
_DEFAULTS["sdxl"].pop("clip_skip", None)


def default_config(base_type: str) -> dict[str, Any]:
    """Per-base defaults as an editable kohya-keyed dict (a fresh copy each call)."""
    if base_type not in BASE_TYPES:
        raise ConfigError([("base_type", f"must be one of {', '.join(BASE_TYPES)}, got {base_type!r}")])
    return json.loads(json.dumps(_DEFAULTS[base_type]))


# ---- value checkers: each returns the typed value or raises _Bad(reason) ----

class _Bad(Exception):
    pass


def _as_int(value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise _Bad(f"must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if not isinstance(value, int):
        raise _Bad(f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise _Bad(f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise _Bad(f"must be at most {maximum}, got {value}")
    return value


def _as_float(value: Any, *, minimum: float | None = None, maximum: float | None = None,
              positive: bool = False) -> float:
    if isinstance(value, bool):
        raise _Bad(f"must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _Bad(f"must be a number, got {value!r}") from None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise _Bad(f"must be a finite number, got {value!r}")
    value = float(value)
    if positive and value <= 0:
        raise _Bad(f"must be greater than 0, got {_number(value)}")
    if minimum is not None and value < minimum:
        raise _Bad(f"must be at least {_number(minimum)}, got {_number(value)}")
    if maximum is not None and value > maximum:
        raise _Bad(f"must be at most {_number(maximum)}, got {_number(value)}")
    return value


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Bad(f"must be true or false, got {value!r}")


def _as_choice(value: Any, choices: tuple[str, ...]) -> str:
    if isinstance(value, str):
        for choice in choices:
            if value.strip().lower() == choice.lower():
                return choice
    raise _Bad(f"must be one of {', '.join(choices)}, got {value!r}")


def _as_resolution(value: Any) -> tuple[int, int]:
    if isinstance(value, list | tuple) and len(value) in (1, 2):
        parts = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)?", value):
        parts = [int(p) for p in value.split(",")]
    else:
        raise _Bad(f'must be a size like 512 or "512,768" (width,height), got {value!r}')
    sizes = [_as_int(p, minimum=64, maximum=4096) for p in parts]
    for size in sizes:
        if size % 8:
            raise _Bad(f"must be a multiple of 8, got {size}")
    return (sizes[0], sizes[-1])


def _as_output_name(value: Any) -> str:
    if not isinstance(value, str) or not _OUTPUT_NAME.match(value):
        raise _Bad("must be 1-100 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                   f"got {value!r}")
    return value


def _as_caption_extension(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"\.[A-Za-z0-9_]{1,20}", value):
        raise _Bad(f'must be a file extension like ".txt" or ".caption", got {value!r}')
    return value


def parse_sample_prompt(line: str) -> SamplePrompt:
    """One prompt line with kohya's flags: `a cat --n blurry --w 512 --h 512 --d 1 --s 20 --l 7`."""
    prompt, *flags = line.strip().split(" --")
    values: dict[str, Any] = {"prompt": prompt.strip()}
    for flag in flags:
        match = _SAMPLE_FLAG.match(flag.strip())
        if not match:
            raise _Bad(f"unknown flag --{flag.strip().split(' ')[0]} in {line.strip()!r} "
                       "(use --n --w --h --d --s --l)")
        name, arg = match.group(1), (match.group(2) or "").strip()
        try:
            if name == "n":
                values["negative_prompt"] = arg
            elif name in ("w", "h"):
                size = _as_int(arg, minimum=64, maximum=4096)
                if size % 8:
                    raise _Bad(f"must be a multiple of 8, got {size}")
                values["width" if name == "w" else "height"] = size
            elif name == "d":
                values["seed"] = _as_int(arg, minimum=0)
            elif name == "s":
                values["steps"] = _as_int(arg, minimum=1, maximum=150)
            elif name == "l":
                values["guidance_scale"] = _as_float(arg, minimum=0.0, maximum=50.0)
            # --ss (sampler) is kohya's; samples always use the checkpoint's scheduler.
        except _Bad as bad:
            raise _Bad(f"--{name} in {line.strip()!r} {bad}") from None
    if not values["prompt"]:
        raise _Bad(f"empty prompt in {line.strip()!r}")
    return SamplePrompt(**values)


def _as_sample_prompts(value: Any) -> tuple[SamplePrompt, ...]:
    if isinstance(value, str):
        lines = value.splitlines()
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        lines = list(value)
    else:
        raise _Bad(f"must be a list of prompt lines or newline-separated text, got {value!r}")
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) > 16:
        raise _Bad(f"at most 16 prompts, got {len(lines)}")
    return tuple(parse_sample_prompt(ln) for ln in lines)


def _optional(check):
    def inner(value: Any) -> Any:
        return None if value is None else check(value)
    return inner


_CHECKS: dict[str, Any] = {
    "network_dim": lambda v: _as_int(v, minimum=1, maximum=1024),
    "network_alpha": lambda v: _as_float(v, positive=True, maximum=4096),
    "unet_lr": lambda v: _as_float(v, minimum=0.0, maximum=1.0),
    "text_encoder_lr": lambda v: _as_float(v, minimum=0.0, maximum=1.0),
    "network_train_unet_only": _as_bool,
    "max_train_epochs": lambda v: _as_int(v, minimum=1, maximum=10_000),
    "max_train_steps": _optional(lambda v: _as_int(v, minimum=1, maximum=10_000_000)),
    "train_batch_size": lambda v: _as_int(v, minimum=1, maximum=256),
    "resolution": _as_resolution,
    "enable_bucket": _as_bool,
    "min_bucket_reso": lambda v: _as_int(v, minimum=32, maximum=4096),
    "max_bucket_reso": lambda v: _as_int(v, minimum=32, maximum=4096),
    "bucket_reso_steps": lambda v: _as_int(v, minimum=8, maximum=1024),
    "cache_latents": _as_bool,
    "gradient_checkpointing": _as_bool,
    "mixed_precision": lambda v: _as_choice(v, MIXED_PRECISIONS),
    "seed": lambda v: _as_int(v, minimum=0, maximum=2**32 - 1),
    "save_every_n_epochs": lambda v: _as_int(v, minimum=0, maximum=10_000),
    "sample_prompts": _as_sample_prompts,
    "sample_every_n_epochs": lambda v: _as_int(v, minimum=0, maximum=10_000),
    "clip_skip": _optional(lambda v: _as_int(v, minimum=1, maximum=12)),
    "lr_scheduler": lambda v: _as_choice(v, LR_SCHEDULERS),
    "lr_warmup_steps": lambda v: _as_int(v, minimum=0, maximum=10_000_000),
    "optimizer_type": lambda v: _as_choice(v, OPTIMIZERS),
    "max_grad_norm": lambda v: _as_float(v, minimum=0.0, maximum=1e6),
    "output_name": _as_output_name,
    "noise_offset": lambda v: _as_float(v, minimum=0.0, maximum=1.0),
    "caption_extension": _as_caption_extension,
    "shuffle_caption": _as_bool,
    "keep_tokens": lambda v: _as_int(v, minimum=0, maximum=75),
    "flip_aug": _as_bool,
}
#: every key parse_config accepts and uses (the kohya names).
KNOWN_KEYS = frozenset(_CHECKS) | {"learning_rate"}


def _load_text(text: str, fmt: str | None) -> dict[str, Any]:
    if fmt is None:
        fmt = "json" if text.lstrip().startswith("{") else "toml"
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError([("", f"not valid JSON: {exc}")]) from None
        if not isinstance(data, dict):
            raise ConfigError([("", "JSON config must be an object of key/value pairs")])
        return data
    if fmt == "toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([("", f"not valid TOML: {exc}")]) from None
        # sd-scripts config files may group keys in tables ([model_arguments], ...); it flattens them.
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        return flat
    raise ConfigError([("", f"fmt must be 'toml', 'json' or None, got {fmt!r}")])


def _check(raw: Mapping[str, Any] | str, base_type: str, fmt: str | None) -> TrainingConfig:
    if base_type not in BASE_TYPES:
        raise ConfigError([("base_type", f"must be one of {', '.join(BASE_TYPES)}, got {base_type!r}")])
    data = _load_text(raw, fmt) if isinstance(raw, str) else dict(raw)
    problems: list[tuple[str, str]] = []
    warnings: list[str] = []
    values: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            problems.append((str(key), "keys must be strings"))
        elif key in RUN_FILE_KEYS:
            problems.append((key, "set by the studio (the chosen model, dataset and output), not in the config"))
        elif key in IGNORED_KEYS:
            warnings.append(f"{key}: ignored (kohya setting the studio does not use)")
        elif key == "learning_rate":
            try:
                values[key] = _as_float(value, minimum=0.0, maximum=1.0)
            except _Bad as bad:
                problems.append((key, str(bad)))
        elif key not in _CHECKS:
            problems.append((key, "unknown key"))
        else:
            try:
                values[key] = _CHECKS[key](value)
            except _Bad as bad:
                problems.append((key, str(bad)))
    # kohya: unet_lr / text_encoder_lr fall back to learning_rate when not given.
    base_lr = values.pop("learning_rate", None)
    if base_lr is not None:
        values.setdefault("unet_lr", base_lr)
        values.setdefault("text_encoder_lr", base_lr)
    if base_type == "sdxl" and values.get("clip_skip") is not None:
        problems.append(("clip_skip", "is for SD1.5 only; SDXL always uses the penultimate layer"))
    defaults = _DEFAULTS[base_type]
    bad = {key for key, _ in problems}
    merged = {k: v for k, v in defaults.items() if k in _CHECKS and k not in values and k not in bad}
    for key, value in merged.items():
        values[key] = _CHECKS[key](value)
    if not problems:  # the cross-key checks need every value; report them once the single keys are right
        problems += _check_together(values)
    if problems:
        raise ConfigError(problems)
    return TrainingConfig(base_type=base_type, warnings=tuple(warnings), **values)


def _check_together(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    lo, hi, step = values["min_bucket_reso"], values["max_bucket_reso"], values["bucket_reso_steps"]
    if step % 8:
        problems.append(("bucket_reso_steps", f"must be a multiple of 8, got {step}"))
    if lo > hi:
        problems.append(("min_bucket_reso", f"must not exceed max_bucket_reso ({hi}), got {lo}"))
    elif values["enable_bucket"]:
        w, h = values["resolution"]
        if max(w, h) > hi or min(w, h) < lo:
            problems.append(("resolution", f"{w}x{h} must lie between min_bucket_reso ({lo}) and "
                                           f"max_bucket_reso ({hi})"))
    if values["network_train_unet_only"] is False and values["unet_lr"] == 0 and values["text_encoder_lr"] == 0:
        problems.append(("unet_lr", "unet_lr and text_encoder_lr are both 0: nothing would train"))
    if values["network_train_unet_only"] and values["unet_lr"] == 0:
        problems.append(("unet_lr", "must be greater than 0 with network_train_unet_only"))
    if values["sample_every_n_epochs"] and not values["sample_prompts"]:
        problems.append(("sample_prompts", "sample_every_n_epochs is set but there are no sample prompts"))
    return problems


def parse_config(raw: Mapping[str, Any] | str, *, base_type: str, fmt: str | None = None) -> TrainingConfig:
    """Check a config (dict, or TOML/JSON text) for `base_type`; ConfigError names every bad key.

    Missing keys take `default_config(base_type)`; ignored kohya keys end up in `.warnings`.
    """
    return _check(raw, base_type, fmt)


def format_config(raw: Mapping[str, Any] | str, *, base_type: str, fmt: str | None = None) -> tuple[str, list[str]]:
    """The config as normalised TOML (every key, defaults filled in) plus its warnings."""
    config = parse_config(raw, base_type=base_type, fmt=fmt)
    return to_toml(config.to_dict()), list(config.warnings)


def to_toml(values: Mapping[str, Any]) -> str:
    """Flat TOML for a kohya-keyed dict (str, int, float, bool and lists of str only)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, list):
            if not value:
                lines.append(f"{key} = []")
            else:
                lines.append(f"{key} = [")
                lines += [f"    {_toml_value(v)}," for v in value]
                lines.append("]")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _number(value) if "e" in _number(value) or "." in _number(value) else f"{_number(value)}.0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value)) if abs(value) < 1e15 else repr(value)
