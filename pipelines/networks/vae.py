"""External VAE files: loaded once (LRU by sha256 and target), swapped into a job's pipeline.

The engine never changes the provider's base pipeline: each job sets ``vae`` on its own derived
(``from_pipe``) pipeline to either the checkpoint's VAE or one from this cache, so "restoring" is just
the next job choosing again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from pipelines.types import ModelRef

logger = logging.getLogger(__name__)

VaeLoader = Callable[..., Any]  # load_vae(path, *, like=<pipeline>, device, dtype) -> AutoencoderKL


def _default_loader() -> VaeLoader:
    from pipelines.loader import load_vae

    return load_vae


class VaeCache:
    """Loaded VAEs keyed by (sha256, architecture of the VAE they replace, device, dtype)."""

    def __init__(self, loader: VaeLoader | None = None, max_items: int = 2) -> None:
        self._loader = loader
        self.max_items = max_items
        self.loads = 0
        self._items: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, ref: ModelRef, *, like, device: torch.device | str, dtype: torch.dtype):
        """The VAE of ``ref`` shaped like the VAE of pipeline ``like`` (its config gives scaling etc.)."""
        config = like.vae.config
        key = (ref.sha256, config.get("scaling_factor"), tuple(config.get("block_out_channels", ())),
               str(device), str(dtype))
        vae = self._items.get(key)
        if vae is not None:
            self._items.move_to_end(key)
            return vae
        loader = self._loader or _default_loader()
        vae = loader(ref.path, like=like, device=device, dtype=dtype)
        vae.eval()
        self.loads += 1
        self._items[key] = vae
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return vae

    def clear(self) -> None:
        self._items.clear()
