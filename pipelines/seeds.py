"""Seeds and initial noise with A1111 semantics, reproducible on any device.

Every image draws its noise from its own CPU ``torch.Generator`` seeded with its own seed, so image i
of a batch is the same whether it is generated alone or in a batch, on CPU or on a GPU. The same
generators are then handed to the sampler for its per-step noise (ancestral/SDE samplers), continuing
the stream exactly as A1111's ImageRNG does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipelines.types import RANDOM_SEED_RANGE, GenerationRequest


@dataclass(frozen=True)
class SeedPlan:
    """Seeds for every image of a request (batch_size × n_iter), chosen once."""

    seeds: list[int]
    subseeds: list[int]
    subseed_strength: float
    resize_from: tuple[int, int] | None  # (width, height) in pixels

    def batch(self, iteration: int, batch_size: int) -> tuple[list[int], list[int]]:
        start = iteration * batch_size
        return self.seeds[start:start + batch_size], self.subseeds[start:start + batch_size]


def plan_seeds(request: GenerationRequest, rng: random.Random | None = None) -> SeedPlan:
    """A1111: -1 means random in [0, 4294967294); image i gets seed+i, or (with variation) subseed+i."""
    rng = rng or random.SystemRandom()
    seed = request.seed if request.seed != -1 else rng.randrange(RANDOM_SEED_RANGE)
    subseed = request.subseed if request.subseed != -1 else rng.randrange(RANDOM_SEED_RANGE)
    n = request.total_images
    variation = request.subseed_strength > 0
    seeds = [seed + (0 if variation else i) for i in range(n)]
    subseeds = [subseed + i for i in range(n)]
    resize = None
    if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
        resize = (request.seed_resize_from_w, request.seed_resize_from_h)
    return SeedPlan(seeds, subseeds, request.subseed_strength, resize)


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (falls back to lerp when nearly parallel)."""
    a, b = low.flatten(), high.flatten()
    dot = torch.dot(a / a.norm(), b / b.norm()).clamp(-1.0, 1.0)
    if dot.abs() > 0.9995:
        return low * (1 - t) + high * t
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so) * low + (torch.sin(t * omega) / so) * high


def _paste_centered(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Put ``source`` noise in the middle of ``target`` (cropping whichever is larger), as A1111 does."""
    _, th, tw = target.shape
    _, sh, sw = source.shape
    dy, dx = (th - sh) // 2, (tw - sw) // 2
    h, w = min(sh, th), min(sw, tw)
    ty, tx = max(dy, 0), max(dx, 0)
    sy, sx = max(-dy, 0), max(-dx, 0)
    out = target.clone()
    out[:, ty:ty + h, tx:tx + w] = source[:, sy:sy + h, sx:sx + w]
    return out


def _randn(seed: int, shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    gen = generator if generator is not None else torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def make_noise(
    shape: Sequence[int], seeds: Sequence[int], subseeds: Sequence[int] = (), subseed_strength: float = 0.0,
    resize_from: tuple[int, int] | None = None, latent_factor: int = 8,
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Initial latent noise ``[B, *shape]`` (CPU float32) plus the per-image generators to continue with.

    ``resize_from`` (pixels) makes the noise come from a smaller/larger canvas so a seed keeps its
    composition at another size ("Seed resize from").
    """
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise_shape = tuple(shape)
    if resize_from is not None:
        noise_shape = (shape[0], resize_from[1] // latent_factor, resize_from[0] // latent_factor)
    batch = []
    for i, (seed, gen) in enumerate(zip(seeds, generators, strict=True)):
        resized = noise_shape != tuple(shape)
        sub = None
        if subseed_strength > 0 and subseeds:
            sub = _randn(subseeds[i], noise_shape)
        noise = _randn(seed, noise_shape) if resized else _randn(seed, shape, gen)
        if sub is not None:
            noise = slerp(subseed_strength, noise, sub)
        if resized:
            noise = _paste_centered(_randn(seed, shape, gen), noise)
        batch.append(noise)
    return torch.stack(batch), generators
