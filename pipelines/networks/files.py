"""Reading network files (LoRA, embeddings, hypernetworks) through the project's safe loaders.

Container detection, header validation and the restricted unpickler live in ``pipelines.safe_files``;
this module only adapts them to what the network code needs (tensors plus safetensors metadata, or the
raw plain-data object of an A1111 ``.pt``). Nothing pickled is ever executed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipelines import safe_files
from pipelines.errors import ModelFormatError

logger = logging.getLogger(__name__)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header = safe_files.read_safetensors_header(path)
    return safe_files.load_safetensors(path), dict(header.metadata)


def read_pickle(path: Path) -> Any:
    """The plain-data object of a pickled file (``UnsafeModelError`` for anything executable)."""
    return safe_files.load_pickle(path)


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (and safetensors metadata) of a LoRA/embedding file of either container."""
    path = Path(path)
    if safe_files.detect_kind(path) is safe_files.FileKind.SAFETENSORS:
        return read_safetensors(path)
    obj = safe_files.unwrap_state_dict(read_pickle(path))
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{path.name} holds a {type(obj).__name__}, not a dict of tensors")
    return safe_files.tensors_of(obj, source=path.name), {}
