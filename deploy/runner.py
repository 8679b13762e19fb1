"""One job runner for every host: a ``JobSpec`` in, progress events out, a terminal event back.

The local backend's worker threads and the serving container (deploy/container/) both run jobs through
``JobRunner``: it builds the device's engine on first use (``PipelineCache`` + ``Engine`` + ControlNet
annotators), materialises the job's model files through ``ModelFiles`` (pinned while the job runs, so the
disk cache cannot evict them mid-load), runs the engine and maps what it raises to the wire vocabulary
(``Failed(kind=oom|bad_request|internal)``, ``Cancelled`` keeping finished batches). Torch and diffusers
are imported inside methods, so importing this module stays cheap. Nothing here imports webapp.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.backends.messages import Cancelled, Event, Failed, JobModels, JobSpec, ModelSpec, Succeeded
from deploy.backends.workers import EtaClock, progress_event
from deploy.model_files import ModelFileError, ModelFiles
from deploy.storage import StorageError

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]
Check = Callable[[], bool]


@dataclass(frozen=True)
class RunnerConfig:
    """How a runner builds its engine: the same knobs on the app's server and in the container."""

    skeleton_dirs: tuple[Path, ...] = ()
    cache_bytes: int | None = None
    """Pipeline cache budget; None: from the device (``pipelines.cache.auto_budget``)."""
    preview_every: int = 5
    dtype: str | None = None
    cpu_threads: int | None = None
    annotators_dir: Path | None = None
    """ControlNet preprocessor weights; None: ControlNet units are refused with a clear message."""


def start_cpu_threads() -> None:
    """Start torch's CPU thread pool on the calling thread. A process whose jobs run on the CPU in worker
    threads calls it on its main thread first: when a process's first parallel CPU op runs on a worker thread,
    that thread's later ops stay slow (measured on 2 cores with the tiny SD1.5: 20 steps took 15-50 s in the
    serving container instead of 0.3 s; bench/remote_overhead.py). Costs the torch import and a few ms."""
    import torch

    x = torch.ones(256, 256)
    torch.mm(x, x)
    torch.nn.functional.layer_norm(torch.ones(64, 512), (512,))


class RunnerStopped(Exception):
    """The job was cancelled because its host is stopping (the host reports ``interrupted``)."""


class _Runtime:
    """The engine on one device, built on the first job's thread."""

    def __init__(self, device: str, auto: bool, config: RunnerConfig) -> None:
        from pipelines.cache import PipelineCache, auto_budget
        from pipelines.controlnet.preprocessors import Annotators
        from pipelines.devices import choose_device
        from pipelines.engine import Engine
        from pipelines.errors import PipelineError

        try:
            choice = choose_device(device, config.dtype)
        except PipelineError:
            if not auto:
                raise
            log.warning("device %s was detected but torch cannot use it; this worker runs on the CPU", device)
            choice = choose_device("cpu", config.dtype)
        if choice.device == "cpu" and config.cpu_threads:
            import torch

            torch.set_num_threads(config.cpu_threads)
        self.device = choice.device
        budget = config.cache_bytes or auto_budget(choice.device)
        self.cache = PipelineCache(budget_bytes=budget, device=choice.device, dtype=choice.dtype,
                                   skeleton_dirs=config.skeleton_dirs)
        self.engine = Engine(self.cache, device=choice.device, dtype=choice.dtype,
                             preview_every=config.preview_every)
        self.annotators = Annotators(config.annotators_dir, choice.device) if config.annotators_dir else None
        log.info("job runner ready on %s (%s); pipeline cache budget %.1f GiB", choice.device, choice.reason,
                 budget / 1024**3)

    def release_memory(self) -> None:
        self.engine.release_memory()
        if self.annotators is not None:
            self.annotators.unload()


class JobRunner:
    """Runs jobs on one device (``cuda:N``, ``cpu``, ``mps``), one at a time (the caller serialises)."""

    def __init__(self, device: str, *, model_files: ModelFiles, config: RunnerConfig, auto: bool = False) -> None:
        self.device_label = device
        self.model_files = model_files
        self.config = config
        self.auto = auto
        """The device was detected rather than named: fall back to the CPU when torch cannot use it."""
        self._runtime: _Runtime | None = None
        self._lock = threading.Lock()

    @property
    def runtime(self) -> _Runtime:
        with self._lock:
            if self._runtime is None:
                self._runtime = _Runtime(self.device_label, self.auto, self.config)
            return self._runtime

    def release_memory(self) -> bool:
        """Free the loaded models; False when the engine was never built (nothing to free)."""
        with self._lock:
            runtime = self._runtime
        if runtime is None:
            return False
        runtime.release_memory()
        return True

    # -- one job ---------------------------------------------------------------------------------------
    def run(self, spec: JobSpec, *, emit: Emit, should_cancel: Check, should_skip: Check,
            stopping: Check = lambda: False) -> Event:
        """Run ``spec``; ``emit`` gets its ``Progress`` events, the terminal event is returned. A cancel
        while ``stopping()`` raises ``RunnerStopped``. A device that cannot start raises (an internal
        failure of the host, not of the request)."""
        from pipelines.controlnet.preprocessors import BrokenAnnotator, MissingAnnotator
        from pipelines.errors import PipelineError
        from pipelines.types import Cancelled as EngineCancelled
        from pipelines.types import InvalidRequestError, OutOfMemoryError

        runtime = self.runtime
        clock = EtaClock()
        try:
            request = spec.request  # validated where it entered this process (JobSpec's contract)
            with ExitStack() as stack:
                models = self._resolve(spec.models, stack)

                def on_event(p: Any) -> None:
                    preview = base64.b64encode(p.preview).decode("ascii") if p.preview else None
                    emit(progress_event(spec.job_id, p.step, p.total, p.job_no, p.job_count, clock, preview,
                                        p.phase))

                controls, warnings = self._controls(runtime, spec, request, models, stack)
                result = runtime.engine.generate(request, models, on_event=on_event, should_cancel=should_cancel,
                                                 should_skip=should_skip, controls=controls,
                                                 infotext_params=controlnet_params(spec), validated=True)
        except EngineCancelled as exc:
            if stopping():
                raise RunnerStopped(spec.job_id) from exc
            kept = outputs(exc.partial) if exc.partial is not None else {}  # the batches finished before
            return Cancelled(job_id=spec.job_id, reason="cancelled while running", **kept)
        except OutOfMemoryError as exc:
            return Failed(job_id=spec.job_id, message=str(exc), kind="oom")
        except MemoryError:
            return Failed(job_id=spec.job_id, kind="oom",
                          message="out of memory on this server; lower the batch size or the resolution")
        except InvalidRequestError as exc:
            return Failed(job_id=spec.job_id, message=str(exc), kind="bad_request", field=exc.field)
        except PipelineError as exc:
            return Failed(job_id=spec.job_id, message=str(exc), kind="bad_request")
        except ModelFileError as exc:
            return Failed(job_id=spec.job_id, message=f"model file unavailable: {exc}", kind="internal")
        except (MissingAnnotator, BrokenAnnotator) as exc:  # the admin's annotators folder, not the request
            return Failed(job_id=spec.job_id, message=str(exc), kind="internal")
        return Succeeded(job_id=spec.job_id, **outputs(result, controls, warnings))

    def _controls(self, runtime: _Runtime, spec: JobSpec, request: Any, models: Any,
                  stack: ExitStack) -> tuple[list[Any], list[str]]:
        """The job's ControlNet sources: files pinned, each checked to fit the checkpoint, loaded via the cache."""
        from pipelines.controlnet.apply import build_sources
        from pipelines.errors import PipelineError
        from pipelines.types import ModelRef

        if not spec.controlnet_units:
            return [], []
        if runtime.annotators is None:
            raise PipelineError("ControlNet units need an annotators folder; this backend has none configured")
        refs = []
        for unit_spec in spec.models.controlnets:
            path = self._pin(unit_spec, stack)
            refs.append(ModelRef(name=unit_spec.name, path=path, sha256=unit_spec.sha256, kind=unit_spec.kind))
        units = list(spec.controlnet_units)
        base = runtime.cache.get(models.checkpoint.path, models.checkpoint.sha256)
        warnings: list[str] = []
        sources = build_sources(units, refs, request, base.unet.config, runtime.cache.controlnet, runtime.annotators,
                                warnings)
        return sources, warnings

    def _pin(self, spec: ModelSpec, stack: ExitStack) -> Path:
        """The local path of ``spec``'s file, pinned until the job ends; a file this host cannot get (not at its
        ``local_path`` here, not in the store) raises ``ModelFileError`` naming the model."""
        try:
            return stack.enter_context(self.model_files.pinned(spec.file))[0]
        except (ModelFileError, StorageError) as exc:
            raise ModelFileError(f"{spec.kind} {spec.name!r}: {exc}") from exc

    def _resolve(self, models: JobModels, stack: ExitStack) -> Any:
        """Materialise every file the job may use (pinned until the job ends) as a ``ResolvedModels``."""
        from pipelines.types import ModelRef, ResolvedModels

        def ref(spec: ModelSpec) -> ModelRef:
            path = self._pin(spec, stack)
            return ModelRef(name=spec.name, path=path, sha256=spec.sha256, kind=spec.kind, lora_hash=spec.lora_hash)

        def group(g: Any) -> dict[str, ModelRef]:
            return {name: ref(spec) for name, spec in g.items()}

        return ResolvedModels(
            checkpoint=ref(models.checkpoint),
            vae=ref(models.vae) if isinstance(models.vae, ModelSpec) else models.vae,
            companion_vae=ref(models.companion_vae) if models.companion_vae else None,
            loras=group(models.loras), embeddings=group(models.embeddings),
            hypernetworks=group(models.hypernetworks),
            refiner=ref(models.refiner) if models.refiner else None,
        )


def outputs(result: Any, controls: Sequence[Any] = (), warnings: Sequence[str] = ()) -> dict[str, Any]:
    """The image fields of ``Succeeded``/``Cancelled`` from an engine ``GenerationResult``.

    The detected maps of the ControlNet units that ask for them (``save_detected_map``) follow the generated
    images, as the extension appends them: ``images`` holds both, while ``infotexts``, ``seeds`` and
    ``info`` (its ``all_seeds``, ``infotexts``, ``batch_size``) describe the generated ones only, so the
    images past ``len(infotexts)`` are the maps (History and PNG Info give them no seed or infotext)."""
    maps = tuple(_png(c.detected_map) for c in controls if c.unit.save_detected_map and c.detected_map is not None)
    return {"images": tuple(result.images) + maps, "infotexts": tuple(result.infotexts),
            "seeds": tuple(result.seeds), "warnings": tuple(dict.fromkeys((*result.warnings, *warnings))),
            "timings": dict(result.timings), "info": result.a1111_info()}


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def controlnet_params(spec: JobSpec) -> dict[str, str]:
    """The ``ControlNet N`` infotext entries (the extension's format), models named ``name [hash8]``."""
    from pipelines.controlnet.infotext import controlnet_params as entries

    return entries(list(spec.controlnet_units), [f"{m.name} [{m.sha256[:8]}]" for m in spec.models.controlnets])
