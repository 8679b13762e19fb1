"""The local backend: one worker thread per device of this machine, each with its own engine.

``devices="auto"`` means every CUDA device (counted without importing torch, from the NVIDIA driver's
/proc entries or ``/dev/nvidiaN`` nodes, and ``CUDA_VISIBLE_DEVICES``) or one CPU worker where there is
none. Each worker imports
torch and builds its ``PipelineCache`` + ``Engine`` when its first job arrives — never on the app's
start-up path — and materialises model files through ``ModelFiles`` (pinned while the job runs, so
the disk cache cannot evict them mid-load).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from deploy.backends.base import BackendNotConfigured, Capabilities
from deploy.backends.messages import (
    Cancelled,
    Event,
    Failed,
    JobModels,
    JobSpec,
    ModelSpec,
    Started,
    Succeeded,
)
from deploy.backends.registry import BackendConfig
from deploy.backends.workers import EtaClock, ThreadedBackend, Worker, progress_event
from deploy.model_files import ModelFileError, ModelFiles

log = logging.getLogger(__name__)

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")
DEV_DIR = Path("/dev")
_DEVICE_NODE = re.compile(r"nvidia\d+")


def _count_gpus(proc_dir: Path, dev_dir: Path) -> int:
    """The driver's /proc entries; containers often lack them but get the ``/dev/nvidiaN`` nodes."""
    try:
        if proc_dir.is_dir():
            found = len([p for p in proc_dir.iterdir() if p.is_dir()])
            if found:
                return found
        return len([p for p in dev_dir.iterdir() if _DEVICE_NODE.fullmatch(p.name)]) if dev_dir.is_dir() else 0
    except OSError:
        return 0


def detect_devices(environ: dict[str, str] | None = None, proc_dir: Path = NVIDIA_PROC,
                   dev_dir: Path = DEV_DIR) -> list[str]:
    """CUDA devices visible to this process, without importing torch; ``["cpu"]`` when there are none."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    present = _count_gpus(proc_dir, dev_dir)
    if visible is not None:
        entries = [v for v in visible.split(",") if v.strip() and not v.strip().startswith("-")]
        present = min(present, len(entries)) if present else 0
    return [f"cuda:{i}" for i in range(present)] or ["cpu"]


def parse_devices(value: str | Sequence[str] | None) -> list[str] | None:
    """``"auto"``/None → None (detect at start); ``"cuda:0,cuda:1"`` or a list → that list."""
    if value is None:
        return None
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v and v.strip()]
    if not items or items == ["auto"]:
        return None
    for item in items:
        if item.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"`devices` entry {item!r} is not cpu, cuda, cuda:N or mps")
    return items


class _DeviceRuntime:
    """A worker's engine on its device, built on the worker's thread at its first job."""

    def __init__(self, device: str, auto: bool, backend: LocalBackend) -> None:
        from pipelines.cache import PipelineCache, auto_budget
        from pipelines.controlnet.preprocessors import Annotators
        from pipelines.devices import choose_device
        from pipelines.engine import Engine
        from pipelines.errors import PipelineError

        try:
            choice = choose_device(device, backend.dtype)
        except PipelineError:
            if not auto:
                raise
            log.warning("device %s was detected but torch cannot use it; this worker runs on the CPU", device)
            choice = choose_device("cpu", backend.dtype)
        if choice.device == "cpu":
            import torch

            if backend.cpu_threads:
                torch.set_num_threads(backend.cpu_threads)
        self.device = choice.device
        budget = backend.cache_bytes or auto_budget(choice.device)
        self.cache = PipelineCache(budget_bytes=budget, device=choice.device, dtype=choice.dtype,
                                   skeleton_dirs=backend.skeleton_dirs)
        self.engine = Engine(self.cache, device=choice.device, dtype=choice.dtype,
                             preview_every=backend.preview_every)
        self.annotators = Annotators(backend.annotators_dir, choice.device) if backend.annotators_dir else None
        log.info("local worker ready on %s (%s); pipeline cache budget %.1f GiB", choice.device, choice.reason,
                 budget / 1024**3)


class LocalBackend(ThreadedBackend):
    kind = "local"

    def __init__(self, name: str, *, model_files: ModelFiles | None, devices: str | Sequence[str] | None = "auto",
                 skeleton_dirs: Sequence[str | Path] = (), cache_gb: float | None = None, preview_every: int = 5,
                 dtype: str | None = None, cpu_threads: int | None = None,
                 annotators_dir: str | Path | None = None) -> None:
        super().__init__(name)
        self.model_files = model_files
        self._explicit = parse_devices(devices)
        self.devices = self._explicit or detect_devices()
        self.skeleton_dirs = tuple(Path(d) for d in skeleton_dirs)
        if cache_gb is not None and cache_gb <= 0:
            raise ValueError(f"`pipeline_cache_gb` must be positive, got {cache_gb}")
        self.cache_bytes = int(cache_gb * 1024**3) if cache_gb is not None else None  # None: from the device
        self.preview_every = max(0, int(preview_every))
        self.dtype = dtype
        self.cpu_threads = cpu_threads
        self.annotators_dir = Path(annotators_dir) if annotators_dir else None  # ControlNet preprocessor weights
        self._runtimes: dict[str, _DeviceRuntime] = {}

    def is_configured(self) -> bool:
        return self.model_files is not None

    def capabilities(self) -> Capabilities:
        return Capabilities(slots=len(self.devices), remote=False, previews=self.preview_every > 0,
                            devices=tuple(self.devices))

    def worker_labels(self) -> list[str]:
        if self.model_files is None:
            raise BackendNotConfigured("the local backend needs a model file cache (ModelFiles)")
        return list(self.devices)

    def runtime(self, worker: Worker) -> _DeviceRuntime:
        runtime = self._runtimes.get(worker.label)
        if runtime is None:
            runtime = self._runtimes[worker.label] = _DeviceRuntime(worker.label, self._explicit is None, self)
        return runtime

    def release_memory(self) -> None:
        for label, runtime in list(self._runtimes.items()):
            runtime.engine.vaes.clear()
            runtime.engine.hypernetworks.clear()
            if runtime.annotators is not None:
                runtime.annotators.unload()
            runtime.cache.unload_all()
            log.info("local worker %s: loaded models released", label)

    # -- one job ---------------------------------------------------------------------------------------
    def run_job(self, worker: Worker, spec: JobSpec) -> Event:
        from pipelines.controlnet.preprocessors import BrokenAnnotator, MissingAnnotator
        from pipelines.errors import PipelineError
        from pipelines.types import Cancelled as EngineCancelled
        from pipelines.types import GenerationRequest, InvalidRequestError, OutOfMemoryError

        self.emit(Started(job_id=spec.job_id, worker=f"{self.name}/{worker.label}"))
        runtime = self.runtime(worker)  # a device that cannot start is an internal failure, not the request's
        clock = EtaClock()
        try:
            request = GenerationRequest.from_dict(spec.request)
            with ExitStack() as stack:
                models = self._resolve(spec.models, stack)

                def on_event(p: Any) -> None:
                    preview = base64.b64encode(p.preview).decode("ascii") if p.preview else None
                    self.emit(progress_event(spec.job_id, p.step, p.total, p.job_no, p.job_count, clock, preview,
                                             p.phase))

                controls, warnings = self._controls(runtime, spec, request, models, stack)
                result = runtime.engine.generate(request, models, on_event=on_event,
                                                 should_cancel=self.cancel_check(spec.job_id),
                                                 should_skip=self.skip_check(spec.job_id), controls=controls,
                                                 infotext_params=_controlnet_params(spec))
        except EngineCancelled as exc:
            if self.stopping:
                return self.stopped_event(spec.job_id)
            kept = _outputs(exc.partial) if exc.partial is not None else {}  # the batches finished before
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
        return Succeeded(job_id=spec.job_id, **_outputs(result, controls, warnings))

    def _controls(self, runtime: _DeviceRuntime, spec: JobSpec, request: Any, models: Any,
                  stack: ExitStack) -> tuple[list[Any], list[str]]:
        """The job's ControlNet sources: files pinned, each checked to fit the checkpoint, loaded via the cache."""
        from pipelines.controlnet.apply import build_sources
        from pipelines.controlnet.units import ControlUnit
        from pipelines.errors import PipelineError
        from pipelines.types import ModelRef

        if not spec.controlnet_units:
            return [], []
        if runtime.annotators is None:
            raise PipelineError("ControlNet units need an annotators folder; this backend has none configured")
        assert self.model_files is not None
        refs = []
        for unit_spec in spec.models.controlnets:
            path = stack.enter_context(self.model_files.pinned(unit_spec.file))[0]
            refs.append(ModelRef(name=unit_spec.name, path=path, sha256=unit_spec.sha256, kind=unit_spec.kind))
        units = [ControlUnit.from_dict(u) for u in spec.controlnet_units]
        base = runtime.cache.get(models.checkpoint.path, models.checkpoint.sha256)
        warnings: list[str] = []
        sources = build_sources(units, refs, request, base.unet.config, runtime.cache.controlnet, runtime.annotators,
                                warnings)
        return sources, warnings

    def _resolve(self, models: JobModels, stack: ExitStack) -> Any:
        """Materialise every file the job may use (pinned until the job ends) as a ``ResolvedModels``."""
        from pipelines.types import ModelRef, ResolvedModels

        assert self.model_files is not None
        files = self.model_files

        def ref(spec: ModelSpec) -> ModelRef:
            path = stack.enter_context(files.pinned(spec.file))[0]
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


def _outputs(result: Any, controls: Sequence[Any] = (), warnings: Sequence[str] = ()) -> dict[str, Any]:
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


def _controlnet_params(spec: JobSpec) -> dict[str, str]:
    """The ``ControlNet N`` infotext entries (the extension's format), models named ``name [hash8]``."""
    from pipelines.controlnet.infotext import controlnet_params
    from pipelines.controlnet.units import ControlUnit

    units = [ControlUnit.from_dict(u) for u in spec.controlnet_units]
    return controlnet_params(units, [f"{m.name} [{m.sha256[:8]}]" for m in spec.models.controlnets])


def create(config: BackendConfig) -> LocalBackend:
    from deploy.backends.options import parse_options, plain_options

    options = plain_options(parse_options("local", config.options))
    return LocalBackend(config.name, model_files=config.model_files, **options)
