"""Textual-inversion embedding files (A1111 .pt, A1111/Civitai .safetensors, diffusers, SDXL clip_l/clip_g).

Embeddings are never added to the tokenizer: ``conditioning.PromptEncoder`` finds the embedding's name
in the token stream and substitutes the vectors through a temporary hook, as A1111 does. So there is
nothing to unload and no ``name_1`` sub-token can be left behind (offline-models.md §8); this module
only reads files into ``Embedding`` objects and checks they fit the pipeline's encoders.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from pipelines.conditioning import Embedding
from pipelines.errors import ModelFormatError
from pipelines.networks.files import read_pickle, read_safetensors
from pipelines.types import ModelRef

logger = logging.getLogger(__name__)


def _as_matrix(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2:
        raise ModelFormatError(f"embedding {name!r} has a tensor of shape {tuple(tensor.shape)}, expected [vectors, dim]")
    return tensor.detach().to(torch.float32)


def parse_embedding(data: dict, name: str) -> dict[str, torch.Tensor]:
    """Vectors per encoder key from any known embedding layout."""
    if "clip_l" in data or "clip_g" in data:
        return {k: _as_matrix(data[k], name) for k in ("clip_l", "clip_g") if k in data}
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise ModelFormatError(f"embedding {name!r}: string_to_param is empty")
        return {"clip_l": _as_matrix(next(iter(params.values())), name)}
    if "emb_params" in data:  # A1111/Civitai safetensors
        return {"clip_l": _as_matrix(data["emb_params"], name)}
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:  # diffusers: {"<token>": tensor}
        return {"clip_l": _as_matrix(tensors[0], name)}
    raise ModelFormatError(f"embedding {name!r} has no known layout (keys: {', '.join(map(str, list(data)[:8]))})")


def read_embedding(ref: ModelRef) -> Embedding:
    """Read an embedding file; the name users type is the ModelRef name (A1111: the file stem)."""
    from pipelines import safe_files

    if safe_files.detect_kind(ref.path) is safe_files.FileKind.SAFETENSORS:
        data, _ = read_safetensors(ref.path)
    else:
        data = read_pickle(ref.path)
        if not isinstance(data, dict):
            raise ModelFormatError(f"{ref.path.name} holds a {type(data).__name__}, not an embedding")
    return Embedding(ref.name, parse_embedding(data, ref.name))


def encoder_widths(pipe) -> dict[str, int]:
    """Token-embedding width per encoder key of the pipeline ("clip_l" first encoder, "clip_g" SDXL's second)."""
    widths = {}
    if getattr(pipe, "text_encoder", None) is not None:
        widths["clip_l"] = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if getattr(pipe, "text_encoder_2", None) is not None:
        widths["clip_g"] = pipe.text_encoder_2.get_input_embeddings().weight.shape[1]
    return widths


def incompatibility(embedding: Embedding, pipe) -> str | None:
    """Why ``embedding`` cannot be used with ``pipe`` (A1111 skips such embeddings), or None."""
    widths = encoder_widths(pipe)
    missing = [k for k in widths if k not in embedding.vectors]
    if "clip_g" in embedding.vectors and "clip_g" not in widths:
        return f"embedding {embedding.name!r} is for SDXL and does not fit this checkpoint"
    if missing:
        kind = "SD1.x/SD2.x" if "clip_g" not in embedding.vectors else "SDXL"
        return f"embedding {embedding.name!r} is for {kind} and has no vectors for this checkpoint's {missing[0]} encoder"
    for key, width in widths.items():
        got = embedding.vectors[key].shape[1]
        if got != width:
            return f"embedding {embedding.name!r} has {got}-wide vectors but this checkpoint's {key} encoder needs {width}"
    return None


class EmbeddingCache:
    """Parsed embeddings keyed by file sha256 (small tensors; kept across jobs, LRU-bounded)."""

    def __init__(self, max_items: int = 256) -> None:
        self.max_items = max_items
        self.loads = 0
        self._items: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def get(self, ref: ModelRef) -> Embedding:
        vectors = self._items.get(ref.sha256)
        if vectors is None:
            vectors = dict(read_embedding(ref).vectors)
            self.loads += 1
            self._items[ref.sha256] = vectors
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(ref.sha256)
        return Embedding(ref.name, vectors)
