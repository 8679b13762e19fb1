"""A deterministic backend for tests and demos: real PNGs with A1111 infotext, no model runs.

It honours the contract exactly like a real backend (slots, step-by-step progress with previews,
cancellation within one step, OOM and internal failures on demand, ``interrupted`` on stop), so the
queue, the dispatcher, the APIs and the UI can be tested fast and without torch. Options:

* ``slots`` (1): jobs at once;  ``step_delay`` (0.0 s): time per step;  ``steps``: override the
  request's step count;  ``preview_every`` (1): a preview every N steps (0: none);
* ``fail_prompts``: ``{"oom": "<text>", "internal": "<text>", "bad_request": "<text>"}`` — a prompt
  containing the text fails the job with that kind;  ``remote`` (false): pretend to be a cloud endpoint.

The image is a function of (prompt, seed, size), so the same request gives the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from deploy.backends.base import Capabilities, engine_lists
from deploy.backends.messages import Cancelled, Event, Failed, JobSpec, Succeeded
from deploy.backends.registry import BackendConfig
from deploy.backends.workers import EtaClock, ThreadedBackend, Worker, progress_event

log = logging.getLogger(__name__)

VERSION = "studio fake backend"
_FAIL_MESSAGES = {
    "oom": "out of GPU memory generating {n} image(s) at {w}x{h}; memory was freed — lower the batch size or "
           "the resolution",
    "internal": "internal error: the fake backend was told to crash",
    "bad_request": "the fake backend was told to reject this request",
}


def _color(prompt: str, seed: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


def _pause(seconds: float, cancelled: Callable[[], bool]) -> None:
    """A step's time, cut short by a cancel (a slow step never delays a cancel or a stop by more than ~20 ms)."""
    end = time.monotonic() + seconds
    while not cancelled():
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.02))


def render_png(prompt: str, seed: int, width: int, height: int, infotext: str | None) -> bytes:
    """A gradient in a colour derived from prompt and seed, with the infotext in the PNG."""
    from PIL import Image

    from pipelines.infotext import encode_image

    r, g, b = _color(prompt, seed)
    image = Image.new("RGB", (width, height), (r, g, b))
    stripe = Image.new("RGB", (max(1, width // 4), height), (255 - r, 255 - g, 255 - b))
    image.paste(stripe, (seed % max(1, width), 0))
    return encode_image(image, infotext, "png")


def _preview(prompt: str, seed: int, step: int, total: int) -> str:
    from PIL import Image

    r, g, b = _color(prompt, seed)
    k = step / max(1, total)
    image = Image.new("RGB", (32, 32), (int(r * k), int(g * k), int(b * k)))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class FakeBackend(ThreadedBackend):
    kind = "fake"

    def __init__(self, name: str, *, slots: int = 1, step_delay: float = 0.0, steps: int | None = None,
                 preview_every: int = 1, fail_prompts: Mapping[str, str] | None = None, remote: bool = False) -> None:
        super().__init__(name)
        if slots < 1:
            raise ValueError(f"fake backend slots must be at least 1, got {slots}")
        self.slots = slots
        self.step_delay = float(step_delay)
        self.steps = steps
        self.preview_every = preview_every
        self.fail_prompts = dict(fail_prompts or {})
        self.remote = remote
        self.jobs_run: list[str] = []

    def is_configured(self) -> bool:
        return True

    def capabilities(self) -> Capabilities:
        return Capabilities(slots=self.slots, remote=self.remote, devices=tuple(f"fake{i}" for i in range(self.slots)),
                            **engine_lists())

    def worker_labels(self) -> list[str]:
        return [f"fake{i}" for i in range(self.slots)]

    def run_job(self, worker: Worker, spec: JobSpec) -> Event:
        from deploy.backends.messages import Started

        self.jobs_run.append(spec.job_id)
        self.emit(Started(job_id=spec.job_id, worker=f"{self.name}/{worker.label}"))
        req = spec.request
        prompt = req.prompt
        width, height = req.width, req.height
        batch, n_iter = req.batch_size, req.n_iter
        for kind, text in self.fail_prompts.items():
            if text and text in prompt:
                message = _FAIL_MESSAGES.get(kind, f"failed ({kind})").format(n=batch, w=width, h=height)
                return Failed(job_id=spec.job_id, message=message, kind=kind)
        steps = self.steps or req.steps
        seed = req.seed
        if seed == -1:
            seed = random.randrange(4294967294)
        clock = EtaClock()
        cancelled, skipped = self.cancel_check(spec.job_id), self.skip_check(spec.job_id)
        done: list[int] = []  # seed offsets of the finished images (a skipped batch leaves a gap, like the engine)
        for it in range(n_iter):
            for step in range(1, steps + 1):
                if self.step_delay:
                    _pause(self.step_delay, cancelled)
                if cancelled():
                    if self.stopping:
                        return self.stopped_event(spec.job_id)
                    if not done:
                        return Cancelled(job_id=spec.job_id, reason="cancelled while running")
                    return self._result(spec, seed, steps, done, width, height, Cancelled,
                                        reason="cancelled while running")
                if skipped():
                    break
                preview = None
                if self.preview_every and step % self.preview_every == 0:
                    preview = _preview(prompt, seed, step, steps)
                self.emit(progress_event(spec.job_id, step, steps, it, n_iter, clock, preview))
            else:
                done.extend(range(it * batch, (it + 1) * batch))
        return self._result(spec, seed, steps, done, width, height)

    def _result(self, spec: JobSpec, seed: int, steps: int, offsets: list[int], width: int, height: int,
                outcome: type[Succeeded] | type[Cancelled] = Succeeded, **extra: Any) -> Succeeded | Cancelled:
        from pipelines.infotext import build

        req = spec.request
        checkpoint = spec.models.checkpoint
        seeds = [seed + i for i in offsets]
        count = len(seeds)
        infotexts, images = [], []
        for s in seeds:
            params = {"Steps": steps, "Sampler": req.sampler_name, "CFG scale": req.cfg_scale, "Seed": s, "Size": f"{width}x{height}",
                      "Model hash": checkpoint.sha256[:10], "Model": checkpoint.name, "Version": VERSION}
            text = build(req.prompt, req.negative_prompt, params)
            infotexts.append(text)
            images.append(render_png(req.prompt, s, width, height, text))
        info: dict[str, Any] = {
            "prompt": req.prompt, "all_prompts": [req.prompt] * count, "negative_prompt": req.negative_prompt, "seed": seeds[0] if seeds else seed, "all_seeds": seeds,
            "subseed": -1, "all_subseeds": [-1] * count, "width": width, "height": height,
            "sampler_name": req.sampler_name, "cfg_scale": req.cfg_scale,
            "steps": steps, "batch_size": count, "sd_model_name": checkpoint.name,
            "sd_model_hash": checkpoint.sha256[:10], "sd_vae_name": None, "sd_vae_hash": None, "clip_skip": 1,
            "index_of_first_image": 0, "infotexts": infotexts, "version": VERSION,
        }
        return outcome(job_id=spec.job_id, images=tuple(images), infotexts=tuple(infotexts), seeds=tuple(seeds),
                       timings={"total": 0.0}, info=info, **extra)


def create(config: BackendConfig) -> FakeBackend:
    from deploy.backends.options import parse_options, plain_options

    return FakeBackend(config.name, **plain_options(parse_options("fake", config.options)))
