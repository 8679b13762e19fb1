"""Where to run and in which precision, and how much memory is left there.

Defaults follow what works for Stable Diffusion on each backend: CUDA runs fp16 (the precision
checkpoints are published in and LoRAs are trained against; bf16 is offered where the GPU supports
it, for models that overflow in fp16), Apple MPS runs fp16, CPU runs fp32 (CPU half precision is
slow or unsupported). Everything is overridable; bad overrides are errors, not silent fallbacks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.errors import PipelineError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cuda:0", "mps", "cpu"
    dtype: torch.dtype
    reason: str


@dataclass(frozen=True)
class MemoryInfo:
    """Bytes; VRAM fields are None off CUDA."""

    ram_total: int
    ram_available: int
    vram_total: int | None = None
    vram_free: int | None = None


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """'fp16' / 'bf16' / 'fp32' (and long names) or a torch.dtype -> torch.dtype."""
    import torch

    if isinstance(value, torch.dtype):
        if value not in (torch.float16, torch.bfloat16, torch.float32):
            raise PipelineError(f"dtype {value} is not supported; use float16, bfloat16 or float32")
        return value
    name = _DTYPE_NAMES.get(str(value).lower().removeprefix("torch."))
    if name is None:
        raise PipelineError(f"unknown dtype {value!r}; use fp16, bf16 or fp32")
    return getattr(torch, name)


def _available(device: str) -> bool:
    import torch

    kind = device.split(":")[0]
    if kind == "cpu":
        return True
    if kind == "cuda":
        if not torch.cuda.is_available():
            return False
        index = int(device.split(":")[1]) if ":" in device else 0
        return index < torch.cuda.device_count()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    raise PipelineError(f"unknown device {device!r}; use cuda, cuda:N, mps or cpu")


def choose_device(device: str | None = None, dtype: str | torch.dtype | None = None) -> DeviceChoice:
    """Pick device and dtype; `None` or "auto" means the best available / its default precision."""
    import torch

    if device in (None, "auto"):
        if _available("cuda"):
            device = "cuda:0"
        elif _available("mps"):
            device = "mps"
        else:
            device = "cpu"
        reason = f"auto: {device} is the best device present"
    else:
        device = str(device)
        if device == "cuda":
            device = "cuda:0"
        if not _available(device):
            raise PipelineError(f"device {device!r} was requested but is not available here")
        reason = f"requested {device}"
    kind = device.split(":")[0]
    if dtype in (None, "auto"):
        chosen = torch.float32 if kind == "cpu" else torch.float16
        reason += f"; {str(chosen).removeprefix('torch.')} is the default there"
    else:
        chosen = parse_dtype(dtype)
        if chosen is torch.bfloat16 and kind == "cuda" and not torch.cuda.is_bf16_supported():
            raise PipelineError(f"bfloat16 was requested but {torch.cuda.get_device_name(device)} does not support it")
        reason += f"; {str(chosen).removeprefix('torch.')} requested"
    return DeviceChoice(device, chosen, reason)


def memory_info(device: str = "cpu") -> MemoryInfo:
    """Total/available RAM (psutil) and, on CUDA, total/free VRAM of `device` (torch.cuda.mem_get_info)."""
    import psutil

    vm = psutil.virtual_memory()
    vram_total = vram_free = None
    if str(device).startswith("cuda"):
        import torch

        vram_free, vram_total = torch.cuda.mem_get_info(torch.device(device))
    return MemoryInfo(ram_total=int(vm.total), ram_available=int(vm.available),
                      vram_total=vram_total, vram_free=vram_free)
