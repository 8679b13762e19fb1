"""The generation engine: a typed request + resolved model files → images, infotexts and events.

``Engine`` knows nothing of the web, the database or users. It gets base (txt2img) pipelines from a
provider (``PipelineCache`` in production: ``get(path, sha256=None)``), derives the img2img/inpaint
pipelines from them with ``from_pipe`` (shared modules, no copies), applies the job's networks, runs
the passes (base, SDXL refiner, hires fix) and restores everything afterwards, so the provider's
pipelines are never left modified. One job runs at a time per engine; its steps are in ``job.py``.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from pipelines import samplers
from pipelines.job import Job
from pipelines.networks.hypernetwork import HypernetworkCache
from pipelines.networks.lora import LoraManager, is_sdxl
from pipelines.networks.textual_inversion import EmbeddingCache
from pipelines.networks.vae import VaeCache, VaeLoader
from pipelines.passes import ControlSource, PassSpec, Task, pipeline_class_name, pipeline_part_names
from pipelines.sampling import EventSink, run_pass
from pipelines.types import GenerationRequest, GenerationResult, OutOfMemoryError, Progress, ResolvedModels

logger = logging.getLogger(__name__)


class PipelineProvider(Protocol):
    """Loads base pipelines by file (``PipelineCache``); one that also has ``unload_all()`` is emptied by
    ``Engine.release_memory``."""

    def get(self, path, sha256: str | None = None) -> Any: ...


class Engine:
    """Runs generation jobs on pipelines from ``pipeline_provider``.

    ``preview_every`` > 0 attaches a latent preview to every N-th progress event. ``vae_loader`` loads
    external VAE files (default: ``pipelines.loader.load_vae``).
    """

    def __init__(self, pipeline_provider: PipelineProvider, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, preview_every: int = 0,
                 vae_loader: VaeLoader | None = None, max_loras: int = 8) -> None:
        self.provider = pipeline_provider
        self.device = torch.device(device)
        self.dtype = dtype
        self.preview_every = preview_every
        self.loras = LoraManager(max_loras)
        self.embeddings = EmbeddingCache()
        self.hypernetworks = HypernetworkCache()
        self.vaes = VaeCache(vae_loader)
        self._derived: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._scheduler_configs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    # -- public -----------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, models: ResolvedModels, *,
                 on_event: Callable[[Progress], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 should_skip: Callable[[], bool] | None = None,
                 controls: Sequence[ControlSource] = (),
                 infotext_params: Mapping[str, str] | None = None, validated: bool = False) -> GenerationResult:
        """Run one job. Raises ``InvalidRequestError``/``PipelineError`` for bad input, ``Cancelled`` when
        ``should_cancel()`` turns True (checked every step; ``partial`` holds the batches already done),
        ``OutOfMemoryError`` after freeing memory. ``should_skip()`` turning True drops the current batch
        and goes on with the next (A1111's skip); it must reset itself once it has answered True. ``controls``
        are asked for their input to every pass (``ControlSource.for_pass``); ``infotext_params`` are written
        into every image's infotext (what the caller's controls were, e.g. ``ControlNet 0``). ``validated``: the
        caller ran ``request.validate()`` where the request entered its process (a ``JobSpec`` guarantees it),
        so it is not checked twice; the model-dependent checks run either way."""
        if not validated:
            request.validate()
        with self._lock:
            try:
                return Job(self, request, models, on_event=on_event, should_cancel=should_cancel,
                           should_skip=should_skip, controls=controls, infotext_params=infotext_params).run()
            except torch.cuda.OutOfMemoryError as exc:
                self.vaes.clear()  # reloadable; the pipelines themselves belong to the provider
                self.hypernetworks.clear()
                gc.collect()
                if self.device.type == "cuda" and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise OutOfMemoryError(
                    f"out of GPU memory generating {request.batch_size} image(s) at {request.width}x{request.height}"
                    f"{' with hires fix' if request.enable_hr else ''}; memory was freed — lower the batch size "
                    f"or the resolution") from exc

    def release_memory(self) -> None:
        """Drop every loaded model this engine and its provider hold (A1111's unload-checkpoint, idle unload);
        they load again at the next job that needs them. A running job keeps what it already uses."""
        self.vaes.clear()
        self.hypernetworks.clear()
        unload = getattr(self.provider, "unload_all", None)
        if callable(unload):
            unload()
        gc.collect()
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- pipelines ----------------------------------------------------------------------------------
    def derived(self, base, task: Task, variant: str | None = None, parts: dict[str, Any] | None = None):
        """The pipeline for ``task`` (with controls of ``variant``) sharing ``base``'s modules (cached per base);
        ``parts`` are the components the controls bring (a ControlNet pipeline cannot be built without them)."""
        import diffusers

        if base.unet.config.in_channels == 9:
            task = "inpaint"  # inpainting checkpoints run every task through the inpaint pipeline
        cls = getattr(diffusers, pipeline_class_name(is_sdxl(base), task, variant))
        cache = self._derived.setdefault(base, {})
        if cls not in cache:
            cache[cls] = cls.from_pipe(base, **(parts or {}))
            cache[cls].set_progress_bar_config(disable=True)
        return cache[cls]

    def derived_pipelines(self, base) -> list:
        """Every pipeline derived from ``base`` so far (a job restores their VAE)."""
        return list(self._derived.get(base, {}).values())

    def pipeline(self, base, task: Task, vae, variant: str | None = None, parts: dict[str, Any] | None = None):
        """The derived pipeline for ``task`` with the job's ``vae`` and the pass's ``parts`` in place (the job
        restores both when it ends: ``restore``)."""
        pipe = self.derived(base, task, variant, parts)
        pipe.vae = vae
        for name, part in (parts or {}).items():
            setattr(pipe, name, part)
        return pipe

    @staticmethod
    def restore(pipe, vae) -> None:
        """Put ``pipe``'s own ``vae`` back and drop the per-pass parts a job put on it."""
        pipe.vae = vae
        for name in pipeline_part_names(pipe):
            setattr(pipe, name, None)

    def sample(self, base, spec: PassSpec, sampler: samplers.ResolvedSampler, seeds: list[int], sink: EventSink,
               vae) -> Any:
        """Run one pass on the pipeline derived from ``base`` for its task and controls, with a fresh scheduler."""
        pipe = self.pipeline(base, spec.task, vae, spec.variant, spec.parts)
        scheduler = samplers.build_scheduler(sampler, self.scheduler_config(base), seeds=seeds)
        return run_pass(pipe, spec, scheduler, sink)

    def scheduler_config(self, base) -> dict[str, Any]:
        """The checkpoint's own scheduler config, captured before any job replaced a scheduler."""
        config = self._scheduler_configs.get(base)
        if config is None:
            config = dict(base.scheduler.config)
            self._scheduler_configs[base] = config
        return config
