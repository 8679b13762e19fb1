"""Generation speed of full-size SD1.5 / SDXL: our loader (and Engine) against bare diffusers, same run.

Weights are random (no model downloads): the shipped skeletons give the real architectures, a
full-size A1111-layout checkpoint is written from them, and three paths are timed on one device:

* ``diffusers``: a pipeline constructed directly from the skeleton configs (the baseline);
* ``loader``: ``pipelines.loader.load_checkpoint`` on the single file, then a plain pipeline call;
* ``engine``: ``pipelines.engine.Engine`` behind a ``PipelineCache`` (when that module exists).

All use the Euler scheduler, CFG 7, batch 1. it/s is measured from the first UNet call to the end of
the last one (hooks on the UNet, CUDA-synchronised); s/image is the whole call (text encoders, VAE,
and for the engine, PNG encoding). Ratios are against the diffusers baseline of the same run.

    python bench/gpu.py --device cpu --steps 1 --size 64      # smoke run on CPU (SD1.5 only by default)
    python bench/gpu.py --device cuda --steps 20              # SD1.5 at 512², SDXL at 1024²
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipelines.devices import choose_device  # noqa: E402
from pipelines.skeletons import SHIPPED_ROOT, Skeleton  # noqa: E402

logger = logging.getLogger("bench.gpu")
MODELS = {"sd15": ("sd15", 512), "sdxl": ("sdxl-base", 1024)}
PROMPT = "a photo of a cat, masterpiece"


@dataclass
class Row:
    model: str
    path: str
    load_s: float
    s_per_image: float
    it_per_s: float


class StepClock:
    """Times the denoising loop through hooks on the UNet (first call start -> last call end)."""

    def __init__(self, unet: torch.nn.Module, device: str) -> None:
        self.device = device
        self.first: float | None = None
        self.last = 0.0
        self.calls = 0
        self._handles = [unet.register_forward_pre_hook(self._pre), unet.register_forward_hook(self._post)]

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _pre(self, *_args) -> None:
        if self.first is None:
            self._sync()
            self.first = time.perf_counter()

    def _post(self, *_args) -> None:
        self._sync()
        self.last = time.perf_counter()
        self.calls += 1

    def reset(self) -> None:
        self.first, self.last, self.calls = None, 0.0, 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _time(call: Callable[[], object], unet: torch.nn.Module, device: str, runs: int) -> tuple[float, float]:
    """Warm up once, then mean seconds per call and UNet iterations per second over `runs` calls."""
    clock = StepClock(unet, device)
    try:
        call()
        totals, rates = [], []
        for _ in range(runs):
            clock.reset()
            started = time.perf_counter()
            call()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            totals.append(time.perf_counter() - started)
            rates.append(clock.calls / max(clock.last - (clock.first or clock.last), 1e-9))
        return sum(totals) / runs, sum(rates) / runs
    finally:
        clock.remove()


def _fill_random(module: torch.nn.Module, seed: int) -> None:
    """Norm scales 1, biases 0, weights N(0, 1/fan_in): finite activations through the real-size network.

    Values are slices of one pool of normals: drawing 1e9 fresh ones takes a minute on a small CPU.
    """
    device = next(module.parameters()).device
    pool = torch.randn(1 << 22, generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        for index, (name, param) in enumerate(module.named_parameters()):
            if param.ndim == 1:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            count = param.numel()
            if count > pool.numel():
                values = pool.repeat(-(-count // pool.numel()))[:count]
            else:
                start = (index * 7_919_993) % (pool.numel() - count + 1)
                values = pool[start:start + count]
            param.copy_(values.reshape(param.shape) / math.sqrt(math.prod(param.shape[1:])))


def _materialize(module: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Allocate a meta-parameter module on `device`; buffers (e.g. CLIP position ids) keep their values."""
    buffers = {name: buffer.clone() for name, buffer in module.named_buffers()}
    module = module.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])
    return module.to(dtype)


def build_bare(skeleton: Skeleton, device: str, dtype: torch.dtype):
    """The baseline: a diffusers pipeline constructed from the skeleton's configs with random weights."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    components: dict[str, object] = {}
    for name, (library, cls_name) in skeleton.components().items():
        if library is None or name.startswith("tokenizer"):
            continue
        folder = skeleton.path / name
        if name == "scheduler":
            components[name] = diffusers.EulerDiscreteScheduler.from_config(
                diffusers.EulerDiscreteScheduler.load_config(folder))
            continue
        with init_empty_weights(include_buffers=False):
            if library == "diffusers":
                cls = getattr(diffusers, cls_name)
                module = cls.from_config(cls.load_config(folder))
            else:
                module = getattr(transformers, cls_name)(transformers.CLIPTextConfig.from_pretrained(folder))
        module = _materialize(module, device, dtype)
        _fill_random(module, seed=len(components))
        components[name] = module.eval()
    components |= skeleton.pipeline_kwargs()
    pipe = getattr(diffusers, skeleton.pipeline_class_name)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_call(pipe, steps: int, size: int) -> Callable[[], object]:
    def call() -> object:
        return pipe(PROMPT, num_inference_steps=steps, height=size, width=size, guidance_scale=7.0,
                    generator=torch.Generator().manual_seed(0), output_type="pil")

    return call


def _free_memory() -> None:
    """Return memory after the caller dropped its references (one model in memory at a time)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_model(model: str, args: argparse.Namespace, device: str, dtype: torch.dtype, workdir: Path) -> list[Row]:
    from diffusers import EulerDiscreteScheduler

    from pipelines.hashes import sha256_file
    from pipelines.loader import load_checkpoint
    from tests.tiny.fixtures import write_random_ldm

    skeleton_name, native = MODELS[model]
    skeleton = Skeleton(skeleton_name, SHIPPED_ROOT / skeleton_name, SHIPPED_ROOT)
    size = args.size or native
    rows: list[Row] = []

    started = time.perf_counter()
    pipe = build_bare(skeleton, device, dtype)
    built = time.perf_counter() - started
    rows.append(Row(model, "diffusers", built, *_time(_pipeline_call(pipe, args.steps, size), pipe.unet, device, args.runs)))
    pipe = None
    _free_memory()

    path = workdir / f"{model}-random-fp16.safetensors"
    if not path.exists():
        started = time.perf_counter()
        write_random_ldm(skeleton.path, path, dtype=torch.float16)
        logger.info("wrote %s (%.2f GB) in %.1fs", path.name, path.stat().st_size / 1e9, time.perf_counter() - started)
    started = time.perf_counter()
    pipe = load_checkpoint(path, device=device, dtype=dtype)
    loaded = time.perf_counter() - started
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rows.append(Row(model, "loader", loaded, *_time(_pipeline_call(pipe, args.steps, size), pipe.unet, device, args.runs)))
    pipe = None
    _free_memory()

    if (REPO / "pipelines" / "engine.py").is_file():
        from pipelines.cache import PipelineCache
        from pipelines.engine import Engine
        from pipelines.types import GenerationRequest, ModelRef, ResolvedModels

        started = time.perf_counter()
        digest = sha256_file(path)
        logger.info("sha256 of %s in %.1fs (streamed)", path.name, time.perf_counter() - started)
        cache = PipelineCache(budget_bytes=1 << 40, device=device, dtype=dtype)
        started = time.perf_counter()
        base = cache.get(path, sha256=digest)
        loaded = time.perf_counter() - started
        engine = Engine(cache, device=device, dtype=dtype)
        models = ResolvedModels(checkpoint=ModelRef(name=path.name, path=path, sha256=digest, kind="checkpoint"))
        request = GenerationRequest(prompt=PROMPT, steps=args.steps, width=size, height=size, seed=0,
                                    sampler_name="Euler", cfg_scale=7.0)
        rows.append(Row(model, "engine", loaded, *_time(lambda: engine.generate(request, models), base.unet, device,
                                                          args.runs)))
        cache.unload_all()
        engine = base = cache = None
        _free_memory()
    if not args.keep_files:
        path.unlink(missing_ok=True)
    return rows


def print_table(rows: list[Row], device: str, dtype: torch.dtype, args: argparse.Namespace) -> None:
    print(f"\ndevice {device}, {str(dtype).removeprefix('torch.')}, {args.steps} steps, {args.runs} timed runs, "
          "Euler, CFG 7, batch 1")
    header = f"{'model':6} {'path':10} {'size':>6} {'load s':>8} {'s/image':>9} {'it/s':>8} {'s/img ratio':>12} {'it/s ratio':>11}"
    print(header)
    print("-" * len(header))
    baselines = {r.model: r for r in rows if r.path == "diffusers"}
    for row in rows:
        base = baselines[row.model]
        size = args.size or MODELS[row.model][1]
        print(f"{row.model:6} {row.path:10} {size:>6} {row.load_s:8.2f} {row.s_per_image:9.3f} {row.it_per_s:8.3f} "
              f"{row.s_per_image / base.s_per_image:12.3f} {row.it_per_s / base.it_per_s:11.3f}")
    print("(load s: diffusers = construct from configs + random init; loader/engine = single-file load)")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--dtype", default="auto", help="auto, fp16, bf16 or fp32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=0, help="image side in pixels (default: 512 SD1.5, 1024 SDXL)")
    parser.add_argument("--runs", type=int, default=2, help="timed runs after one warm-up")
    parser.add_argument("--models", default="", help="comma list of sd15,sdxl (default: both on GPU, sd15 on CPU)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoints are written")
    parser.add_argument("--keep-files", action="store_true", help="keep (and reuse) the written checkpoints")
    args = parser.parse_args()
    if args.size and args.size % 8:
        parser.error(f"--size must be a multiple of 8, got {args.size}")
    choice = choose_device(args.device, args.dtype)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    models = [m for m in (args.models or ("sd15" if choice.device == "cpu" else "sd15,sdxl")).split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    logger.info("%s", choice.reason)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="studio-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for model in models:
            rows += bench_model(model, args, choice.device, choice.dtype, workdir)
    print_table(rows, choice.device, choice.dtype, args)


if __name__ == "__main__":
    main()
