"""LoRA / LoCon (kohya and A1111 files) applied per job through peft adapters, without reloading models.

Each file is loaded once per pipeline as a peft adapter named after its sha256 and kept (LRU) so a
later job that uses it again, with any weights, only re-weights it. A job activates exactly the
adapters its prompt names, with separate text-encoder and UNet weights; after the job every LoRA
layer is disabled, which makes peft call the untouched base layer alone: outputs are bit-identical to a
pipeline that never saw a LoRA. We never pass ``cross_attention_kwargs={"scale": ...}`` (it leaks into
later loads, offline-models.md §7).
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipelines.networks.files import read_state_dict
from pipelines.prompts import LoraCall
from pipelines.types import ModelRef

logger = logging.getLogger(__name__)

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_UNSUPPORTED_MARKERS = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "oft_blocks": "OFT",
                        "diff_b": "full-diff (LyCORIS 'full')"}


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA active in the current job, for infotext (``Lora hashes``) and logs."""

    name: str
    ref: ModelRef
    te_weight: float
    unet_weight: float


def is_sdxl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def lora_family(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
    """"sdxl", "sd1", "sd2" or None (unknown) from kohya key prefixes and sd-scripts metadata."""
    base = metadata.get("ss_base_model_version", "")
    if base.startswith("sdxl"):
        return "sdxl"
    if metadata.get("ss_v2") == "True" or base.startswith("sd_v2"):
        return "sd2"
    keys = tensors.keys()
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        return "sdxl"
    if any(k.startswith("lora_unet_") and ("input_blocks" in k or "output_blocks" in k) for k in keys):
        return "sdxl"  # sd-scripts writes sgm names only for SDXL
    if base.startswith("sd_v1"):
        return "sd1"
    return None


def unsupported_kind(tensors: dict[str, torch.Tensor]) -> str | None:
    for key in tensors:
        for marker, kind in _UNSUPPORTED_MARKERS.items():
            if key.endswith(marker) or f".{marker}" in key:
                return kind
    return None


def _tuner_layers(model: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


class LoraManager:
    """Loads, caches and switches LoRA adapters on the pipelines it is given.

    ``loads`` counts file loads (a cached adapter re-used with other weights does not count), which the
    benchmarks and tests use to prove switching never reloads.
    """

    def __init__(self, max_adapters: int = 8) -> None:
        self.max_adapters = max_adapters
        self.loads = 0
        # pipeline -> OrderedDict[sha256, adapter name]; weak so an evicted pipeline frees its adapters
        self._adapters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._active: weakref.WeakSet = weakref.WeakSet()

    def _cache(self, pipe) -> OrderedDict[str, str]:
        cache = self._adapters.get(pipe)
        if cache is None:
            cache = OrderedDict()
            self._adapters[pipe] = cache
        return cache

    def _components(self, pipe) -> dict[str, torch.nn.Module]:
        return {c: getattr(pipe, c) for c in _COMPONENTS if getattr(pipe, c, None) is not None}

    @staticmethod
    def _present(pipe) -> set[str]:
        """Adapters actually on the pipeline (another engine sharing the provider may have added some)."""
        return {a for names in pipe.get_list_adapters().values() for a in names}

    def _load(self, pipe, ref: ModelRef, warnings: list[str]) -> str | None:
        cache = self._cache(pipe)
        adapter = f"lora_{ref.sha256[:16]}"
        present = self._present(pipe)
        if adapter in present:
            cache[ref.sha256] = adapter
            cache.move_to_end(ref.sha256)
            return adapter
        cache.pop(ref.sha256, None)
        tensors, metadata = read_state_dict(ref.path)
        kind = unsupported_kind(tensors)
        if kind is not None:
            warnings.append(f"LoRA {ref.name!r} is a {kind} network, which is not supported; skipped")
            return None
        family = lora_family(tensors, metadata)
        want = "sdxl" if is_sdxl(pipe) else "sd1"
        if family is not None and family != want:
            names = {"sdxl": "SDXL", "sd1": "SD1.x", "sd2": "SD2.x"}
            warnings.append(f"LoRA {ref.name!r} is for {names[family]} and cannot be used with this "
                            f"{names[want]} checkpoint; skipped")
            return None
        ours = [a for a in present if a.startswith("lora_")]
        while len(ours) >= self.max_adapters:
            lru = next((a for a in cache.values() if a in ours), ours[0])
            pipe.delete_adapters(lru)
            ours.remove(lru)
            for sha, name in list(cache.items()):
                if name == lru:
                    del cache[sha]
        try:
            pipe.load_lora_weights(dict(tensors), adapter_name=adapter)
        except (ValueError, RuntimeError, KeyError) as exc:
            self._drop_partial(pipe, adapter)
            warnings.append(f"LoRA {ref.name!r} does not fit this checkpoint and was skipped ({exc})")
            logger.info("LoRA %s failed to load: %s", ref.path, exc)
            return None
        self.loads += 1
        cache[ref.sha256] = adapter
        return adapter

    @staticmethod
    def _drop_partial(pipe, adapter: str) -> None:
        present = {a for names in pipe.get_list_adapters().values() for a in names}
        if adapter in present:
            pipe.delete_adapters(adapter)

    def apply(self, pipe, calls: Sequence[tuple[LoraCall, ModelRef]], warnings: list[str]) -> list[AppliedLora]:
        """Activate exactly ``calls`` (weights summed when a LoRA is named twice); disable all others."""
        weights: dict[str, list[float]] = {}
        refs: dict[str, ModelRef] = {}
        order: list[str] = []
        for call, ref in calls:
            adapter = self._load(pipe, ref, warnings)
            if adapter is None:
                continue
            if adapter not in weights:
                weights[adapter] = [0.0, 0.0]
                refs[adapter] = ref
                order.append(call.name)
            weights[adapter][0] += call.te_weight
            weights[adapter][1] += call.unet_weight
        applied = [AppliedLora(name, refs[a], w[0], w[1])
                   for name, (a, w) in zip(order, weights.items(), strict=True)]
        active = {a: w for a, w in weights.items() if w != [0.0, 0.0]}
        if not active:
            self.deactivate(pipe)
            return applied
        for component, model in self._components(pipe).items():
            index = 1 if component == "unet" else 0
            for layer in _tuner_layers(model):
                present = [a for a in active if a in layer.scaling]
                if not present:  # only inactive LoRAs touch this layer: run the base layer alone
                    layer.enable_adapters(False)
                    continue
                layer.set_adapter(present)
                layer.enable_adapters(True)
                for a in present:
                    layer.set_scale(a, active[a][index])
        self._active.add(pipe)
        return applied

    def deactivate(self, pipe) -> None:
        """Disable every LoRA layer: the base layers alone run again (exact, no weights touched)."""
        if pipe not in self._active and not self._present(pipe):
            return
        for model in self._components(pipe).values():
            for layer in _tuner_layers(model):
                layer.enable_adapters(False)
        self._active.discard(pipe)

    def unload_all(self, pipe) -> None:
        """Remove every cached adapter from ``pipe`` (memory pressure, or before handing it elsewhere)."""
        self.deactivate(pipe)
        self._adapters.pop(pipe, None)
        ours = [a for a in self._present(pipe) if a.startswith("lora_")]
        if ours:
            pipe.delete_adapters(ours)
