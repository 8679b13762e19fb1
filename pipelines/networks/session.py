"""Per-job network bookkeeping: which referenced networks exist, fit, are active, and what to report.

A ``NetworkSession`` is opened for one job on one base pipeline. It resolves prompt references against
the caller's ``ResolvedModels`` (A1111's "Networks not found: a, b" for missing names), activates
LoRAs and hypernetworks for a pass, loads the embeddings a prompt uses, and on ``close()`` leaves the
pipeline exactly as it found it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipelines.conditioning import Embedding
from pipelines.errors import PipelineError
from pipelines.networks.hypernetwork import HypernetworkCache, HypernetworkHooks
from pipelines.networks.lora import AppliedLora, LoraManager
from pipelines.networks.textual_inversion import EmbeddingCache, incompatibility
from pipelines.prompts import ExtraNetworks, referenced_words
from pipelines.types import ModelRef

logger = logging.getLogger(__name__)


def _lookup(refs: Mapping[str, ModelRef], name: str) -> ModelRef | None:
    """Exact name first, then case-insensitive (users type names from memory; files keep their case)."""
    if name in refs:
        return refs[name]
    lowered = name.lower()
    matches = [ref for key, ref in refs.items() if key.lower() == lowered]
    return matches[0] if len(matches) == 1 else None


@dataclass
class NetworkSession:
    pipe: object
    loras: LoraManager
    hypernet_cache: HypernetworkCache
    embedding_cache: EmbeddingCache
    available_loras: Mapping[str, ModelRef]
    available_hypernets: Mapping[str, ModelRef]
    available_embeddings: Mapping[str, ModelRef]
    warnings: list[str]
    applied_loras: dict[str, AppliedLora] = field(default_factory=dict)
    used_hypernets: dict[str, ModelRef] = field(default_factory=dict)
    _hooks: HypernetworkHooks = field(default_factory=HypernetworkHooks)
    _not_found: list[str] = field(default_factory=list)

    def activate(self, nets: ExtraNetworks) -> None:
        """Make exactly ``nets`` active on the pipeline (replacing what a previous pass activated)."""
        self._hooks.remove()
        calls = []
        for call in nets.loras:
            ref = _lookup(self.available_loras, call.name)
            if ref is None:
                self._missing(call.name)
            else:
                calls.append((call, ref))
        for applied in self.loras.apply(self.pipe, calls, self.warnings):
            self.applied_loras.setdefault(applied.name, applied)
        hypers = []
        for call in nets.hypernets:
            ref = _lookup(self.available_hypernets, call.name)
            if ref is None:
                self._missing(call.name)
                continue
            unet = self.pipe.unet
            param = next(unet.parameters())
            try:
                net = self.hypernet_cache.get(ref, param.device, param.dtype)
            except PipelineError as exc:
                self.warnings.append(f"hypernetwork {call.name!r} could not be loaded: {exc}")
                continue
            widths = {m.to_k.in_features for m in unet.modules()
                      if hasattr(m, "to_k") and hasattr(getattr(m, "to_k", None), "in_features")}
            if not widths & set(net.layers):
                self.warnings.append(f"hypernetwork {call.name!r} has no layers for this checkpoint's attention "
                                     f"widths ({sorted(net.layers)} vs {sorted(widths)}); skipped")
                continue
            hypers.append((net, call.multiplier))
            self.used_hypernets[call.name] = ref
        if hypers:
            self._hooks.install(self.pipe.unet, hypers)

    def _missing(self, name: str) -> None:
        if name not in self._not_found:
            self._not_found.append(name)

    def embeddings_for(self, *texts: str) -> dict[str, Embedding]:
        """Embeddings whose names occur in ``texts`` and fit the pipeline (misfits become warnings)."""
        names = referenced_words(" ".join(texts), list(self.available_embeddings))
        found: dict[str, Embedding] = {}
        for name in names:
            ref = self.available_embeddings[name]
            try:
                emb = self.embedding_cache.get(ref)
            except PipelineError as exc:
                self.warnings.append(f"embedding {name!r} could not be loaded: {exc}")
                continue
            problem = incompatibility(emb, self.pipe)
            if problem:
                self.warnings.append(f"{problem}; skipped")
                continue
            found[name] = emb
        return found

    def finish_warnings(self) -> None:
        if self._not_found:
            self.warnings.insert(0, "Networks not found: " + ", ".join(self._not_found))

    def close(self) -> None:
        """Remove hypernetwork hooks and disable LoRA layers: the pipeline is as before the job."""
        self._hooks.remove()
        self.loras.deactivate(self.pipe)


def lora_hashes(applied: Mapping[str, AppliedLora]) -> str | None:
    """A1111 ``Lora hashes`` value: ``name: 12hex`` pairs, name as written with ``:``/``,`` removed."""
    if not applied:
        return None
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {a.ref.short_hash}" for name, a in applied.items())


def ti_hashes(used: Mapping[str, ModelRef]) -> str | None:
    if not used:
        return None
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {ref.short_hash}" for name, ref in used.items())
