"""A1111 hypernetworks (.pt): residual MLPs on the attention context before ``to_k`` and ``to_v``.

diffusers and peft have no hypernetwork support. Rather than replacing the UNet's attention processors
(and re-implementing attention), the modules run as forward *pre-hooks* on each attention's ``to_k``
and ``to_v`` layers: whatever processor (SDPA, xformers) and whatever LoRA wrapping is installed, the
projection receives ``context + mlp(context) * multiplier`` exactly where A1111 applies it, in every
self- and cross-attention whose context width has a module in the file. Removing the hooks restores
the UNet exactly; several hypernetworks chain in prompt order.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines.errors import ModelFormatError
from pipelines.networks.files import read_pickle
from pipelines.types import ModelRef

logger = logging.getLogger(__name__)


def _activations() -> dict[str, type[nn.Module]]:
    """A1111's table: its named few plus every torch activation class by lower-cased name."""
    table: dict[str, type[nn.Module]] = {
        name.lower(): cls for name, cls in inspect.getmembers(nn.modules.activation, inspect.isclass)
        if issubclass(cls, nn.Module) and cls.__module__ == nn.modules.activation.__name__
    }
    table.update({"relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
                  "tanh": nn.Tanh, "sigmoid": nn.Sigmoid})
    return table


ACTIVATIONS = _activations()


class HypernetworkModule(nn.Module):
    """One residual MLP; ``multiplier`` is set per job (A1111 ``<hypernet:name:multiplier>``)."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.linear = layers
        self.multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * self.multiplier


def _build_mlp(state: dict[str, torch.Tensor], meta: dict, name: str) -> nn.Sequential:
    """Rebuild the Sequential from the file's ``linear.{i}`` keys and its activation settings.

    In A1111's layout each Linear may be followed by an activation, a LayerNorm and a Dropout; only
    Linear and LayerNorm carry weights, so the gap right after a Linear is its activation when one
    applies (not on the output layer unless ``activate_output``), any other gap a Dropout (identity at
    inference).
    """
    if "linear1.weight" in state:  # the first hypernetwork format: two linears, no activation
        return nn.Sequential(OrderedDict(
            (n, _linear(state, f"{n}.", name)) for n in ("linear1", "linear2")))
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"linear\.(\d+)\.weight$", k))})
    if not indices:
        raise ModelFormatError(f"hypernetwork {name!r}: no linear layers in a module")
    activation = str(meta.get("activation_func") or "linear").lower()
    if activation != "linear" and activation not in ACTIVATIONS:
        raise ModelFormatError(f"hypernetwork {name!r}: unknown activation function {activation!r}")
    activate_output = bool(meta.get("activate_output", False))
    linear_positions = [i for i in indices if state[f"linear.{i}.weight"].ndim == 2]
    last_linear = linear_positions[-1]
    layers: list[nn.Module] = []
    for i in range(indices[-1] + 1):
        if i in indices:
            weight = state[f"linear.{i}.weight"]
            if weight.ndim == 2:
                layers.append(_linear(state, f"linear.{i}.", name))
            else:
                norm = nn.LayerNorm(weight.shape[0])
                norm.load_state_dict({"weight": weight, "bias": state[f"linear.{i}.bias"]})
                layers.append(norm)
        elif (i - 1) in linear_positions and activation != "linear" and (i - 1 != last_linear or activate_output):
            layers.append(ACTIVATIONS[activation]())
        else:
            layers.append(nn.Identity())  # dropout slot
    if activate_output and activation != "linear" and indices[-1] == last_linear:
        layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def _linear(state: dict[str, torch.Tensor], prefix: str, name: str) -> nn.Linear:
    weight, bias = state[f"{prefix}weight"], state.get(f"{prefix}bias")
    if weight.ndim != 2:
        raise ModelFormatError(f"hypernetwork {name!r}: {prefix}weight has shape {tuple(weight.shape)}")
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})})
    return layer


@dataclass
class Hypernetwork:
    """Modules per context width: ``layers[dim] = (k_module, v_module)``."""

    name: str
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = field(default_factory=dict)

    def to(self, device: torch.device, dtype: torch.dtype) -> Hypernetwork:
        for pair in self.layers.values():
            for module in pair:
                module.to(device=device, dtype=dtype)
        return self

    def set_multiplier(self, value: float) -> None:
        for pair in self.layers.values():
            for module in pair:
                module.multiplier = value


def read_hypernetwork(ref: ModelRef) -> Hypernetwork:
    data = read_pickle(ref.path)
    if not isinstance(data, dict):
        raise ModelFormatError(f"{ref.path.name} holds a {type(data).__name__}, not a hypernetwork")
    net = Hypernetwork(ref.name)
    for key, value in data.items():
        if not isinstance(key, int):
            continue
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ModelFormatError(f"hypernetwork {ref.name!r}: entry {key} is not a (k, v) pair")
        modules = tuple(HypernetworkModule(_build_mlp(dict(sd), data, ref.name)).eval() for sd in value)
        net.layers[key] = modules  # type: ignore[assignment]
    if not net.layers:
        raise ModelFormatError(f"{ref.path.name} has no hypernetwork layers (no integer width keys)")
    return net


class HypernetworkHooks:
    """Installs hypernetworks on a UNet for one job; ``remove()`` restores it exactly."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self, unet: nn.Module, nets: Sequence[tuple[Hypernetwork, float]]) -> int:
        """Hook every attention's to_k/to_v whose input width has modules; returns the count hooked."""
        from diffusers.models.attention_processor import Attention

        active = [(net, m) for net, m in nets if m != 0.0]
        for net, mult in active:
            net.set_multiplier(mult)
        hooked = 0
        for module in unet.modules():
            if not isinstance(module, Attention) or getattr(module, "to_k", None) is None:
                continue
            width = module.to_k.in_features if hasattr(module.to_k, "in_features") else None
            if width is None:
                base = getattr(module.to_k, "base_layer", None)
                width = getattr(base, "in_features", None)
            chain_k = [net.layers[width][0] for net, _ in active if width in net.layers]
            chain_v = [net.layers[width][1] for net, _ in active if width in net.layers]
            if not chain_k:
                continue
            self._handles.append(module.to_k.register_forward_pre_hook(_chain_hook(chain_k)))
            self._handles.append(module.to_v.register_forward_pre_hook(_chain_hook(chain_v)))
            hooked += 1
        return hooked

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _chain_hook(modules: list[HypernetworkModule]):
    def hook(_layer: nn.Module, args: tuple):
        x = args[0]
        for module in modules:
            x = module(x)
        return (x, *args[1:])

    return hook


class HypernetworkCache:
    """Parsed hypernetworks keyed by (sha256, device, dtype); small, LRU-bounded."""

    def __init__(self, max_items: int = 8) -> None:
        self.max_items = max_items
        self.loads = 0
        self._items: OrderedDict[tuple[str, str, str], Hypernetwork] = OrderedDict()

    def get(self, ref: ModelRef, device: torch.device, dtype: torch.dtype) -> Hypernetwork:
        key = (ref.sha256, str(device), str(dtype))
        net = self._items.get(key)
        if net is None:
            net = read_hypernetwork(ref).to(device, dtype)
            self.loads += 1
            self._items[key] = net
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return net

    def clear(self) -> None:
        self._items.clear()
