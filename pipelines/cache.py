"""Keeping loaded checkpoints around, least recently used first out, within a memory budget.

Loading a checkpoint costs seconds (SDXL: 10+ s from disk) while switching between two models is
common, so loaded base pipelines are kept while they fit a byte budget for the device they live on.
Sizes are measured from the loaded modules' parameters and buffers, not guessed from file sizes.
Before a load, room is made for an estimate read from the safetensors header, so peak memory stays
within budget too. img2img/inpaint variants are derived with `from_pipe` by the engine and share
these modules, so only base pipelines are cached.

Thread-safe: concurrent `get`s of one model load it once; loads of different models run in
parallel. Eviction only drops the cache's reference — a caller still holding the pipeline keeps it
alive until it lets go.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import PipelineError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Loader = Callable[..., Any]

GIB = 1024**3
VRAM_HEADROOM = 0.25
"""Share of a GPU kept free of cached weights for activations (an SDXL 1024² batch needs several GiB)."""
MIN_VRAM_HEADROOM = 4 * GIB
RAM_SHARE = 0.5
"""Share of the machine's RAM cached weights may use on the CPU (the rest: activations, the app, the OS)."""


def auto_budget(device: str, memory: Any = None) -> int:
    """A cache budget from the device's memory: VRAM minus headroom on CUDA, half the RAM elsewhere.

    ``memory`` is a ``pipelines.devices.MemoryInfo`` (read from the device when None)."""
    if memory is None:
        from pipelines.devices import memory_info

        memory = memory_info(device)
    if str(device).startswith("cuda") and memory.vram_total:
        headroom = max(MIN_VRAM_HEADROOM, int(memory.vram_total * VRAM_HEADROOM))
        return max(GIB, memory.vram_total - headroom)
    return max(GIB, int(memory.ram_total * RAM_SHARE))


@dataclass(frozen=True)
class EntryStats:
    key: str
    path: str
    bytes: int
    hits: int
    last_used: float


@dataclass(frozen=True)
class CacheStats:
    budget_bytes: int
    used_bytes: int
    hits: int
    misses: int
    evictions: int
    entries: tuple[EntryStats, ...]  # least recently used first


@dataclass
class _Entry:
    pipe: Any
    path: Path
    bytes: int
    hits: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    pipe: Any = None
    error: BaseException | None = None


def module_bytes(pipe: Any) -> int:
    """Bytes of all parameters and buffers of a pipeline's torch modules, or of one module (a ControlNet);
    shared tensors counted once."""
    import torch

    seen: set[int] = set()
    total = 0
    components = [pipe] if isinstance(pipe, torch.nn.Module) else pipe.components.values()
    for component in components:
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if tensor.device.type == "meta" or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def estimate_bytes(path: Path, dtype: torch.dtype) -> int:
    """Expected loaded size: header tensor counts at the target precision (EMA copies excluded)."""
    from pipelines.errors import ModelFormatError
    from pipelines.safe_files import FileKind, detect_kind, read_safetensors_header

    try:
        kind = detect_kind(path)
        if kind is FileKind.SAFETENSORS:
            header = read_safetensors_header(path)
            itemsize = dtype.itemsize if hasattr(dtype, "itemsize") else 4
            return sum(t.numel for k, t in header.tensors.items() if not k.startswith("model_ema.")) * itemsize
        if kind is FileKind.DIFFUSERS:
            return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in (".safetensors", ".bin"))
        return path.stat().st_size
    except (ModelFormatError, OSError):
        return 0


class PipelineCache:
    """LRU cache of loaded base pipelines within `budget_bytes` on one device."""

    def __init__(
        self, *, budget_bytes: int, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        skeleton_dirs: Iterable[Path | str] = (), loader: Loader | None = None,
        controlnet_loader: Loader | None = None,
    ) -> None:
        if budget_bytes <= 0:
            raise PipelineError(f"budget_bytes must be positive, got {budget_bytes}")
        import torch

        from pipelines.controlnet.loader import load_controlnet
        from pipelines.loader import load_checkpoint

        self.budget_bytes = int(budget_bytes)
        self.device = str(device)
        self.dtype = dtype or torch.float32
        self.skeleton_dirs = tuple(skeleton_dirs)
        self._loader = loader or load_checkpoint
        self._controlnet_loader = controlnet_loader or load_controlnet
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._hits = self._misses = self._evictions = 0

    @staticmethod
    def key_for(path: Path, sha256: str | None) -> str:
        """Content identity when the caller knows the hash; else path + size + mtime (a replaced file reloads)."""
        if sha256:
            return f"sha256:{sha256.lower()}"
        stat = path.stat()
        return f"path:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"

    def get(self, path: Path | str, sha256: str | None = None) -> Any:
        """The loaded pipeline for `path`, loading it (and evicting others) if needed."""
        path = Path(path)
        return self._get(path, self.key_for(path, sha256), lambda: self._loader(
            path, device=self.device, dtype=self.dtype, skeleton_dirs=self.skeleton_dirs))

    def controlnet(self, path: Path | str, sha256: str | None = None) -> Any:
        """The loaded `ControlNetModel` for `path` on this cache's device and dtype.

        ControlNets share the budget and the LRU order with checkpoints: one memory, one policy."""
        path = Path(path)
        return self._get(path, "controlnet:" + self.key_for(path, sha256), lambda: self._controlnet_loader(
            path, device=self.device, dtype=self.dtype))

    def _get(self, path: Path, key: str, load: Callable[[], Any]) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.hits += 1
                entry.last_used = time.monotonic()
                self._hits += 1
                return entry.pipe
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
                self._misses += 1
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return pending.pipe
        try:
            self._evict_until(self.budget_bytes - estimate_bytes(path, self.dtype))
            pipe = load()
            size = module_bytes(pipe)
            with self._lock:
                self._entries[key] = _Entry(pipe, path, size)
            if size > self.budget_bytes:
                logger.warning("%s needs %d bytes, more than the whole cache budget of %d; keeping only it",
                               path.name, size, self.budget_bytes)
            self._evict_until(self.budget_bytes, keep=key)
            pending.pipe = pipe
            return pipe
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            with self._lock:
                self._pending.pop(key, None)
            pending.done.set()

    def _evict_until(self, limit: int, keep: str | None = None) -> None:
        """Drop least recently used entries until the total is at most `limit` (never `keep`)."""
        dropped: list[_Entry] = []
        with self._lock:
            for key in list(self._entries):
                if sum(e.bytes for e in self._entries.values()) <= max(limit, 0):
                    break
                if key == keep:
                    continue
                dropped.append(self._entries.pop(key))
                self._evictions += 1
        if not dropped:
            return
        released = [(entry.path.name, entry.bytes) for entry in dropped]
        dropped.clear()
        for name, size in released:
            logger.info("evicted %s (%d bytes) from the pipeline cache", name, size)
        self._free_memory()

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def evict(self, path: Path | str, sha256: str | None = None) -> bool:
        """Drop one model (a checkpoint or a ControlNet); True if it was cached."""
        key = self.key_for(Path(path), sha256)
        with self._lock:
            entry = self._entries.pop(key, None) or self._entries.pop("controlnet:" + key, None)
            if entry is not None:
                self._evictions += 1
        if entry is None:
            return False
        del entry
        self._free_memory()
        return True

    def unload_all(self) -> None:
        """Drop every cached pipeline and return the memory to the device."""
        with self._lock:
            self._evictions += len(self._entries)
            self._entries.clear()
        self._free_memory()

    def stats(self) -> CacheStats:
        with self._lock:
            entries = tuple(EntryStats(k, str(e.path), e.bytes, e.hits, e.last_used) for k, e in self._entries.items())
            return CacheStats(self.budget_bytes, sum(e.bytes for e in entries), self._hits, self._misses,
                              self._evictions, entries)

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str | Path):
            return False
        with self._lock:
            return any(e.path == Path(path) for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
