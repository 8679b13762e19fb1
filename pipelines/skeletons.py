"""Config skeletons: diffusers pipeline folders with every config but no weights.

A single-file checkpoint holds weights only; diffusers needs configs to build the modules, and would
fetch them from the Hub. We ship skeletons instead (assets/skeletons) and choose one by what the
checkpoint's tensors say — the `Architecture` — never by its file name.

Layout of a skeleton root (a directory on the search path)::

    <root>/vocabularies/<vocab>/vocab.json, merges.txt    BPE files, stored once per root
    <root>/<skeleton>/model_index.json                     a diffusers pipeline folder without weights
    <root>/<skeleton>/{unet,vae,text_encoder,...}/config.json, scheduler/scheduler_config.json
    <root>/<skeleton>/tokenizer/tokenizer_config.json      names its vocabulary ("studio_vocabulary")

Tokenizers are built from the shared vocabulary when a skeleton is used (`Skeleton.tokenizers()`) and
passed to diffusers as objects, so the 3.6 MB tokenizer.json is never shipped once per skeleton and
nothing has to be written at load time (the install may be read-only). Test skeletons for tiny models
are written by `write_skeleton` in exactly this format.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pipelines.errors import ModelFormatError, SkeletonNotFoundError
from pipelines.probe import Architecture

logger = logging.getLogger(__name__)

SHIPPED_ROOT = Path(__file__).resolve().parent.parent / "assets" / "skeletons"
VOCAB_KEY = "studio_vocabulary"
_TOKENIZER_KEYS = ("model_max_length", "bos_token", "eos_token", "unk_token", "pad_token")


def search_path(extra_dirs: Iterable[Path | str] = ()) -> list[Path]:
    """Skeleton roots in priority order: the caller's extra dirs first, then the shipped assets."""
    roots = [Path(d) for d in extra_dirs]
    if SHIPPED_ROOT.is_dir() and SHIPPED_ROOT not in roots:
        roots.append(SHIPPED_ROOT)
    return roots


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"cannot read config {path}: {exc}") from exc


@functools.lru_cache(maxsize=64)
def _architecture_cached(folder: str, stamp: tuple[float, ...]) -> Architecture:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    path = Path(folder)
    index = _read_json(path / "model_index.json")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(_read_json(path / "unet" / "config.json"))
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    adm = shapes.get("add_embedding.linear_1.weight")

    def width(name: str) -> int | None:
        if (index.get(name) or [None])[0] is None:
            return None
        return int(_read_json(path / name / "config.json")["hidden_size"])

    vae = _read_json(path / "vae" / "config.json") if (index.get("vae") or [None])[0] else None
    return Architecture(
        unet_in_channels=shapes["conv_in.weight"][1], unet_channels=shapes["conv_in.weight"][0],
        context_dim=next(s[1] for k, s in sorted(shapes.items()) if k.endswith("attn2.to_k.weight")),
        adm_in_channels=adm[1] if adm else None,
        transformer_blocks=sum(1 for k in shapes if k.endswith(".attn1.to_q.weight")),
        input_blocks=1 + sum(len(b.resnets) + (1 if b.downsamplers else 0) for b in unet.down_blocks),
        text_widths=(width("text_encoder"), width("text_encoder_2")),
        vae_channels=vae["block_out_channels"][0] if vae else None,
    )


def architecture_from_folder(folder: Path) -> Architecture:
    """The Architecture a diffusers folder (or skeleton) describes; the UNet is built on the meta device."""
    folder = Path(folder)
    configs = [folder / "model_index.json", folder / "unet" / "config.json"]
    stamp = tuple(p.stat().st_mtime for p in configs if p.exists())
    return _architecture_cached(str(folder.resolve()), stamp)


@dataclass(frozen=True)
class Skeleton:
    """One skeleton folder on the search path."""

    name: str
    path: Path
    root: Path

    @cached_property
    def model_index(self) -> dict[str, Any]:
        return _read_json(self.path / "model_index.json")

    @property
    def pipeline_class_name(self) -> str:
        return str(self.model_index["_class_name"])

    @property
    def architecture(self) -> Architecture:
        return architecture_from_folder(self.path)

    def components(self) -> dict[str, tuple[str | None, str | None]]:
        return {k: tuple(v) for k, v in self.model_index.items()
                if not k.startswith("_") and isinstance(v, list) and len(v) == 2}

    def _vocabulary(self, config: dict[str, Any], folder: Path) -> tuple[Path, Path]:
        if (folder / "vocab.json").is_file():
            return folder / "vocab.json", folder / "merges.txt"
        name = config.get(VOCAB_KEY)
        if not name or "/" in name or name.startswith("."):
            raise ModelFormatError(f"{folder}/tokenizer_config.json names no valid {VOCAB_KEY} (got {name!r})")
        vocab_dir = self.root / "vocabularies" / name
        if not (vocab_dir / "vocab.json").is_file() or not (vocab_dir / "merges.txt").is_file():
            raise ModelFormatError(f"skeleton {self.name}: vocabulary {name!r} missing under {vocab_dir}")
        return vocab_dir / "vocab.json", vocab_dir / "merges.txt"

    def tokenizers(self) -> dict[str, Any]:
        """Fresh tokenizer objects for every tokenizer component (fresh: TI loading mutates them)."""
        from transformers import CLIPTokenizer

        out: dict[str, Any] = {}
        for name, (library, _cls) in self.components().items():
            if not name.startswith("tokenizer") or library is None:
                continue
            folder = self.path / name
            config = _read_json(folder / "tokenizer_config.json")
            vocab, merges = self._vocabulary(config, folder)
            kwargs = {k: config[k] for k in _TOKENIZER_KEYS if k in config}
            out[name] = CLIPTokenizer(vocab=str(vocab), merges=str(merges), **kwargs)
        return out

    def pipeline_kwargs(self) -> dict[str, Any]:
        """What to pass to `from_single_file` besides the config: tokenizers, and None for absent parts."""
        kwargs: dict[str, Any] = {name: None for name, (lib, _c) in self.components().items() if lib is None}
        kwargs.update(self.tokenizers())
        return kwargs


def list_skeletons(extra_dirs: Iterable[Path | str] = ()) -> list[Skeleton]:
    """All skeletons on the search path, earlier roots first."""
    found: list[Skeleton] = []
    for root in search_path(extra_dirs):
        if not root.is_dir():
            logger.warning("skeleton directory %s does not exist", root)
            continue
        for folder in sorted(p for p in root.iterdir() if (p / "model_index.json").is_file()):
            found.append(Skeleton(folder.name, folder, root))
    return found


def find_skeleton(arch: Architecture, extra_dirs: Iterable[Path | str] = ()) -> Skeleton:
    """The first skeleton whose configs describe exactly this architecture."""
    extra_dirs = list(extra_dirs)
    candidates = list_skeletons(extra_dirs)
    for skeleton in candidates:
        if skeleton.architecture == arch:
            return skeleton
    roots = ", ".join(str(r) for r in search_path(extra_dirs)) or "(none)"
    raise SkeletonNotFoundError(
        f"no config skeleton matches this checkpoint (UNet width {arch.unet_channels}, {arch.unet_in_channels} input "
        f"channels, context {arch.context_dim}, text encoders {arch.text_widths}); searched {roots} "
        f"({', '.join(s.name for s in candidates) or 'no skeletons'})"
    )


def _bpe_files(tokenizer: Any) -> tuple[str, str]:
    """vocab.json and merges.txt text of a (fast) CLIP tokenizer's base BPE model, added tokens excluded."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ModelFormatError(f"tokenizer model {model.get('type')!r} is not BPE")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = json.dumps(model["vocab"], ensure_ascii=False)
    return vocab, "#version: 0.2\n" + "".join(m + "\n" for m in merges)


def write_vocabulary(root: Path, name: str, vocab_json: str, merges_txt: str) -> Path:
    """Store a vocabulary under root/vocabularies/name; an existing one must be identical."""
    folder = Path(root) / "vocabularies" / name
    if folder.exists():
        same = ((folder / "vocab.json").read_text() == vocab_json and (folder / "merges.txt").read_text() == merges_txt)
        if not same:
            raise FileExistsError(f"vocabulary {name!r} already exists in {root} with different content")
        return folder
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(vocab_json)
    (folder / "merges.txt").write_text(merges_txt)
    return folder


def _write_tokenizer(tokenizer: Any, folder: Path, root: Path, vocabulary: str | None) -> None:
    vocab_json, merges_txt = _bpe_files(tokenizer)
    name = vocabulary or "bpe-" + hashlib.sha256((vocab_json + merges_txt).encode()).hexdigest()[:12]
    write_vocabulary(root, name, vocab_json, merges_txt)
    config = {"tokenizer_class": type(tokenizer).__name__.removesuffix("Fast"), VOCAB_KEY: name}
    for key in _TOKENIZER_KEYS:
        value = getattr(tokenizer, key, None)
        config[key] = str(value) if key.endswith("_token") and value is not None else value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def write_skeleton(pipe: Any, root: Path, name: str, *, vocabulary: str | None = None,
                   overwrite: bool = False) -> Skeleton:
    """Write the configs of `pipe` (weights excluded) as skeleton `name` under `root`.

    Works on meta-device pipelines too, so shipped skeletons are produced from configs alone.
    Components other than models, schedulers and tokenizers (safety checker, feature extractor)
    are recorded as absent: the engine does not use them.
    """
    from diffusers import ModelMixin, SchedulerMixin
    from transformers import PreTrainedModel

    root = Path(root)
    target = root / name
    if target.exists() and not overwrite:
        raise FileExistsError(f"skeleton {target} already exists")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        pipe.save_config(staging)  # model_index.json with _class_name and pipeline options
        index = _read_json(staging / "model_index.json")
        for component, value in pipe.components.items():
            folder = staging / component
            if isinstance(value, ModelMixin | SchedulerMixin):
                value.save_config(folder)
            elif isinstance(value, PreTrainedModel):
                config = value.config.to_dict()
                config["architectures"] = [type(value).__name__]
                config.pop("dtype", None)
                config.pop("torch_dtype", None)
                folder.mkdir(parents=True)
                (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            elif value is not None and hasattr(value, "backend_tokenizer"):
                _write_tokenizer(value, folder, root, vocabulary)
            else:
                index[component] = [None, None]
        index.pop("_name_or_path", None)
        (staging / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Skeleton(name, target, root)
