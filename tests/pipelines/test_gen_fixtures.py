"""Shared tiny world for the generation-engine tests: pipelines, network files, a counting provider.

The builders are cached per process (``functools.cache``) so every ``test_gen_*`` / ``test_networks*`` /
``test_inpaint*`` module reuses one set of pipelines and files. Tests that need a pristine pipeline
(bit-identity after a job) build their own with ``fresh_pipeline``.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.engine import Engine  # noqa: E402
from pipelines.types import GenerationRequest, ModelRef, ResolvedModels  # noqa: E402
from tests.tiny import networks  # noqa: E402
from tests.tiny.fixtures import build_pipeline  # noqa: E402

torch.set_num_threads(2)

PIPE_FILES = {"sd15": "tiny-sd15.safetensors", "sd15_inpaint": "tiny-sd15-inpaint.safetensors",
              "sdxl": "tiny-sdxl.safetensors", "sdxl_refiner": "tiny-sdxl-refiner.safetensors"}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Provider:
    """The engine's pipeline provider for tests: file name → pipeline, counting every get."""

    def __init__(self, pipes: dict[str, Any]) -> None:
        self.pipes = pipes
        self.gets = 0

    def get(self, path, sha256: str | None = None):
        self.gets += 1
        return self.pipes[Path(path).name]


@dataclass
class World:
    root: Path
    pipes: dict[str, Any]
    checkpoints: dict[str, ModelRef]
    loras: dict[str, ModelRef] = field(default_factory=dict)
    embeddings: dict[str, ModelRef] = field(default_factory=dict)
    hypernetworks: dict[str, ModelRef] = field(default_factory=dict)
    vaes: dict[str, ModelRef] = field(default_factory=dict)

    def models(self, kind: str = "sd15", **overrides: Any) -> ResolvedModels:
        values: dict[str, Any] = {"checkpoint": self.checkpoints[kind], "loras": self.loras,
                                  "embeddings": self.embeddings, "hypernetworks": self.hypernetworks}
        values.update(overrides)
        return ResolvedModels(**values)


def ref(path: Path, kind: str, name: str | None = None) -> ModelRef:
    return ModelRef(name or path.stem, path, sha256_file(path), kind)


def fresh_pipeline(kind: str = "sd15") -> Any:
    """A new pipeline identical to the shared one of ``kind`` (same seeds), never touched by a job."""
    return build_pipeline(kind, world().root / "tokenizer")


def _write_loha(path: Path, pipe) -> Path:
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    width = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.in_features
    def t() -> torch.Tensor:
        return torch.ones(4, width) * 0.01

    save_file({f"{name}.hada_w1_a": t().T.contiguous(), f"{name}.hada_w1_b": t(),
               f"{name}.hada_w2_a": t().T.contiguous(), f"{name}.hada_w2_b": t(),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return path


@cache
def world() -> World:
    root = Path(tempfile.mkdtemp(prefix="studio-gen-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    pipes = {PIPE_FILES[k]: build_pipeline(k, root / "tokenizer") for k in PIPE_FILES}
    checkpoints = {}
    for kind, name in PIPE_FILES.items():
        fake = root / "ckpt" / name
        fake.parent.mkdir(parents=True, exist_ok=True)
        fake.write_bytes(name.encode())  # the provider maps names to built pipelines; only the hash matters
        checkpoints[kind] = ref(fake, "checkpoint", name)
    w = World(root, pipes, checkpoints)
    sd15, sdxl = pipes[PIPE_FILES["sd15"]], pipes[PIPE_FILES["sdxl"]]
    net = root / "networks"
    w.loras["style"] = ref(networks.write_kohya_lora(net / "style.safetensors", sd15, seed=1), "lora")
    w.loras["detail"] = ref(networks.write_kohya_lora(net / "detail.safetensors", sd15, seed=2, rank=2, alpha=1.0), "lora")
    w.loras["locon"] = ref(networks.write_kohya_lora(net / "locon.safetensors", sd15, seed=3, conv=True), "lora")
    w.loras["xlstyle"] = ref(networks.write_kohya_lora(net / "xlstyle.safetensors", sdxl, seed=4, sdxl_names="sgm"), "lora")
    w.loras["loha"] = ref(_write_loha(net / "loha.safetensors", sd15), "lora")
    w.embeddings["tipt"] = ref(networks.write_textual_inversion(net / "tipt.pt", sd15, vectors=2, seed=5), "embedding")
    w.embeddings["tisafe"] = ref(networks.write_textual_inversion(net / "tisafe.safetensors", sd15, seed=6,
                                                                  fmt="safetensors"), "embedding")
    w.embeddings["tixl"] = ref(networks.write_textual_inversion(net / "tixl.safetensors", sdxl, vectors=2, seed=7,
                                                                fmt="sdxl"), "embedding")
    w.hypernetworks["hyper"] = ref(networks.write_hypernetwork(net / "hyper.pt", sd15, seed=8), "hypernetwork")
    w.vaes["othervae"] = ref(networks.write_vae(net / "othervae.safetensors", seed=9), "vae")
    return w


def engine(world_: World | None = None, **kwargs: Any) -> Engine:
    w = world_ or world()
    return Engine(Provider(w.pipes), **kwargs)


def request(**kwargs: Any) -> GenerationRequest:
    values: dict[str, Any] = {"prompt": "a photo of a cat", "steps": 3, "width": 64, "height": 64, "seed": 42,
                              "sampler_name": "Euler", "cfg_scale": 5.0}
    values.update(kwargs)
    return GenerationRequest(**values)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def diff(a: bytes, b: bytes) -> float:
    """Mean absolute pixel difference of two encoded images (0 = identical)."""
    return float(np.abs(pixels(a) - pixels(b)).mean())


def test_world_builds_every_pipeline_and_file():
    w = world()
    assert len(w.pipes) == 4
    for refs in (w.loras, w.embeddings, w.hypernetworks, w.vaes):
        for r in refs.values():
            assert r.path.is_file() and len(r.sha256) == 64
