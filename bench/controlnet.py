"""Cost of one ControlNet unit: ``Engine.generate`` with one unit vs the same job without, as a ratio.

    python bench/controlnet.py [--runs 5] [--size 128] [--steps 2] [--skip-full]

Two models: the tiny SD1.5 pipeline of the tests with its tiny ControlNet, and the full-size SD1.5 layout
built from the shipped skeletons (``assets/skeletons/sd15``) with random weights and a full-size ControlNet
made from its UNet (``ControlNetModel.from_unet``: the v1.1 architecture). The unit uses the "none"
preprocessor, so the ratio is the cost of running the ControlNet beside the UNet (plus preparing the map
once per job). Runs are interleaved; medians are reported. FLOP floor for SD1.5: the ControlNet is the
UNet's encoder and middle block, about +33 % UNet compute; goal ≤ 1.45× the job without it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.controlnet.apply import ControlNetSource  # noqa: E402
from pipelines.controlnet.preprocessors import Annotators  # noqa: E402
from pipelines.controlnet.units import ControlUnit  # noqa: E402
from pipelines.engine import Engine  # noqa: E402
from pipelines.types import GenerationRequest, ModelRef, ResolvedModels  # noqa: E402

PROMPT = "a photo of a cat, masterpiece"


class _Provider:
    def __init__(self, pipe) -> None:
        self.pipe = pipe

    def get(self, path, sha256=None):
        return self.pipe


def _unet_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure(name: str, pipe, controlnet, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    engine = Engine(_Provider(pipe))
    models = ResolvedModels(ModelRef(f"{name}.safetensors", workdir / f"{name}.safetensors", "0" * 64, "checkpoint"))
    request = GenerationRequest(prompt=PROMPT, negative_prompt="ugly", steps=args.steps, width=args.size,
                                height=args.size, seed=1, sampler_name="Euler", cfg_scale=7.0)
    hint = Image.fromarray(np.random.default_rng(0).integers(0, 255, (args.size, args.size, 3), dtype=np.uint8))
    annotators = Annotators(workdir / "annotators")

    def run(with_unit: bool) -> Callable[[], float]:
        def call() -> float:
            controls = [ControlNetSource(0, ControlUnit(model=name, module="none"), controlnet, hint, annotators)]
            start = time.perf_counter()
            engine.generate(request, models, controls=controls if with_unit else ())
            return time.perf_counter() - start

        return call

    plain, unit = run(False), run(True)
    plain(), unit()  # warm-up: derived pipelines, lazy imports, allocator
    times: dict[str, list[float]] = {"without": [], "one unit": []}
    for _ in range(args.runs):
        times["without"].append(plain())
        times["one unit"].append(unit())
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["one unit"] / med["without"]
    floor = 1 + _unet_params(controlnet) / _unet_params(pipe.unet)
    print(f"{name:<16}{med['without']:>12.3f}{med['one unit']:>12.3f}{ratio:>8.3f}x   (parameter ratio "
          f"UNet+ControlNet / UNet = {floor:.2f})")
    return med


def _tiny(workdir: Path):
    from tests.tiny.controlnets import tiny_controlnet
    from tests.tiny.models import tiny_sd15

    pipe = tiny_sd15(workdir / "tok")
    return pipe, tiny_controlnet(pipe.unet)


def _full(workdir: Path):
    from diffusers import ControlNetModel

    from bench.gpu import build_bare
    from pipelines.skeletons import SHIPPED_ROOT, Skeleton

    pipe = build_bare(Skeleton("sd15", SHIPPED_ROOT / "sd15", SHIPPED_ROOT), "cpu", torch.float32)
    return pipe, ControlNetModel.from_unet(pipe.unet).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-full", action="store_true", help="only the tiny model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the disabled-safety-checker notice of every derived pipeline
    print(f"ControlNet cost — one unit (preprocessor none) vs none, {args.size}x{args.size}, {args.steps} steps, "
          f"Euler, CFG 7, median of {args.runs} interleaved runs, CPU, {torch.get_num_threads()} thread(s)")
    print(f"{'model':<16}{'without s':>12}{'1 unit s':>12}{'ratio':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models = [("tiny SD1.5", _tiny)] + ([] if args.skip_full else [("full SD1.5", _full)])
        for name, build in models:
            pipe, controlnet = build(workdir)
            with torch.inference_mode():
                measure(name, pipe, controlnet, args, workdir)
            del pipe, controlnet
    print("goal: <= 1.45x the job without the unit (FLOP floor for SD1.5: +33 % UNet compute)")


if __name__ == "__main__":
    main()
