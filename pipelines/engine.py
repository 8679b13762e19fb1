"""The generation engine: a typed request + resolved model files → images, infotexts and events.

``Engine`` knows nothing of the web, the database or users. It gets base (txt2img) pipelines from a
provider (``PipelineCache`` in production: ``get(path, sha256=None)``), derives the img2img/inpaint
pipelines from them with ``from_pipe`` (shared modules, no copies), applies the job's networks, runs
the passes (base, SDXL refiner, hires fix) and restores everything afterwards, so the provider's
pipelines are never left modified. One job runs at a time per engine.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch
from PIL import Image

from pipelines import hires, infotext, inpaint, samplers
from pipelines.conditioning import Conditioning, PromptEncoder, pad_to_chunks
from pipelines.errors import PipelineError
from pipelines.images import decode_image
from pipelines.networks.hypernetwork import HypernetworkCache
from pipelines.networks.lora import LoraManager, is_sdxl
from pipelines.networks.session import NetworkSession, lora_hashes, ti_hashes
from pipelines.networks.textual_inversion import EmbeddingCache
from pipelines.networks.vae import VaeCache, VaeLoader
from pipelines.passes import ControlSource, InitImage, InpaintMask, PassSpec, Task, pipeline_class_name
from pipelines.prompts import ExtraNetworks, join_and, parse_extra_networks, prompt_schedule
from pipelines.results import JobFacts, parameters
from pipelines.sampling import CondSchedule, EventSink, expand_for_batch, placement, run_pass
from pipelines.seeds import make_noise, plan_seeds
from pipelines.types import (
    BatchSkipped,
    Cancelled,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    ModelRef,
    OutOfMemoryError,
    Progress,
    ResolvedModels,
)

logger = logging.getLogger(__name__)


class PipelineProvider(Protocol):
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
                 controls: Sequence[ControlSource] = ()) -> GenerationResult:
        """Run one job. Raises ``InvalidRequestError``/``PipelineError`` for bad input, ``Cancelled`` when
        ``should_cancel()`` turns True (checked every step; ``partial`` holds the batches already done),
        ``OutOfMemoryError`` after freeing memory. ``should_skip()`` turning True drops the current batch
        and goes on with the next (A1111's skip); it must reset itself once it has answered True. ``controls``
        are asked for their input to every pass (``ControlSource.for_pass``)."""
        request.validate()
        with self._lock:
            try:
                return _Job(self, request, models, on_event, should_cancel, should_skip, controls).run()
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

    # -- pipelines ----------------------------------------------------------------------------------
    def derived(self, base, task: Task, variant: str | None = None):
        """The pipeline for ``task`` (with controls of ``variant``) sharing ``base``'s modules (cached per base)."""
        import diffusers

        if base.unet.config.in_channels == 9:
            task = "inpaint"  # inpainting checkpoints run every task through the inpaint pipeline
        cls = getattr(diffusers, pipeline_class_name(is_sdxl(base), task, variant))
        cache = self._derived.setdefault(base, {})
        if cls not in cache:
            cache[cls] = cls.from_pipe(base)
            cache[cls].set_progress_bar_config(disable=True)
        return cache[cls]

    def scheduler_config(self, base) -> dict[str, Any]:
        """The checkpoint's own scheduler config, captured before any job replaced a scheduler."""
        config = self._scheduler_configs.get(base)
        if config is None:
            config = dict(base.scheduler.config)
            self._scheduler_configs[base] = config
        return config


class _Job:
    """One ``generate`` call: state shared by its passes."""

    def __init__(self, engine: Engine, request: GenerationRequest, models: ResolvedModels,
                 on_event, should_cancel, should_skip=None, controls: Sequence[ControlSource] = ()) -> None:
        self.e = engine
        self.r = request
        self.models = models
        self.on_event = on_event
        self.should_cancel = should_cancel
        self.should_skip = should_skip
        self.controls = tuple(controls)
        self.warnings: list[str] = []
        self.timings: dict[str, float] = {}
        self._cond_cache: dict[tuple[int, str], Conditioning] = {}
        self.used_embeddings: set[str] = set()

    # -- prompt handling ------------------------------------------------------------------------
    def _clean(self, text: str, what: str) -> tuple[str, ExtraNetworks]:
        clean, nets = parse_extra_networks(text)
        for kind in nets.unknown:
            self.warnings.append(f"unknown extra network type {kind!r} in the {what}; ignored")
        clean, had_and = join_and(clean)
        if had_and:
            self.warnings.append(f"composable diffusion (AND) is not supported; the sub-prompts of the {what} "
                                 f"were encoded as separate chunks")
        return clean, nets

    def _conds(self, encoder: PromptEncoder, pipe, pos: str, neg: str, steps: int,
               nets: ExtraNetworks | None = None) -> CondSchedule:
        """Encoded prompt schedules, cached per job by text and by the network set active (LoRA TE weights)."""
        zero_negative = bool(pipe.config.get("force_zeros_for_empty_prompt", False))

        def enc(text: str, negative: bool) -> Conditioning:
            key = (id(encoder), id(nets), text)
            if key not in self._cond_cache:
                cond = encoder.encode(text)
                if negative and zero_negative and not text.strip():
                    cond = encoder.zeros_like(cond)
                self._cond_cache[key] = cond
                self.used_embeddings |= cond.embeddings_used
            return self._cond_cache[key]

        positive = [(end, enc(t, False)) for end, t in prompt_schedule(pos, steps)]
        negative = [(end, enc(t, True)) for end, t in prompt_schedule(neg, steps)]
        chunks = max(c.chunks for _, c in positive + negative)
        if any(c.chunks != chunks for _, c in positive + negative):
            empty = encoder.empty()
            positive = [(e, pad_to_chunks(c, chunks, empty)) for e, c in positive]
            negative = [(e, pad_to_chunks(c, chunks, empty)) for e, c in negative]
        return CondSchedule(positive, negative, steps)

    # -- the job ------------------------------------------------------------------------------------
    def run(self) -> GenerationResult:
        r, e = self.r, self.e
        started = time.perf_counter()
        self.sampler = samplers.resolve(r.sampler_name, r.scheduler)
        self.hr_sampler = None
        if r.mode == "txt2img" and r.enable_hr:
            self.hr_sampler = samplers.resolve(r.hr_sampler_name or r.sampler_name, r.hr_scheduler or r.scheduler,
                                               field_name="hr_sampler_name")
        for chosen in (self.sampler, self.hr_sampler):
            if chosen is not None and chosen.sampler.note:  # no exact diffusers equivalent: say what ran instead
                self.warnings.append(f"sampler {chosen.name} ran as the {chosen.sampler.note}")
        if r.eta is not None and self.sampler.name != "DDIM":
            self.warnings.append(f"eta is only used by the DDIM sampler here; ignored for {self.sampler.name}")
        self.prompt, nets = self._clean(r.prompt, "prompt")
        self.negative, neg_nets = self._clean(r.negative_prompt, "negative prompt")
        if neg_nets:
            self.warnings.append("extra networks in the negative prompt are ignored")
        self.hr_prompt, self.hr_nets = self.prompt, nets
        self.hr_negative = self.negative
        if r.enable_hr and r.hr_prompt:
            self.hr_prompt, self.hr_nets = self._clean(r.hr_prompt, "hires prompt")
        if r.enable_hr and r.hr_negative_prompt:
            self.hr_negative, _ = self._clean(r.hr_negative_prompt, "hires negative prompt")

        t = time.perf_counter()
        self.base = e.provider.get(self.models.checkpoint.path, self.models.checkpoint.sha256)
        unet_device, _ = placement(self.base.unet)
        if unet_device.type != e.device.type:
            logger.warning("provider returned %s on %s but the engine runs on %s", self.models.checkpoint.name,
                           unet_device, e.device)
        self.refiner = None
        if r.refiner_switch_at is not None:
            self.refiner = self._load_refiner()
        self.timings["load"] = time.perf_counter() - t
        self.sdxl = is_sdxl(self.base)
        if r.mode == "txt2img" and self.sdxl and getattr(self.base, "text_encoder", None) is None:
            raise InvalidRequestError(
                "sd_model_checkpoint", f"{self.models.checkpoint.name!r} is an SDXL refiner: it refines images "
                "(img2img, inpaint, or as `refiner_checkpoint` after an SDXL base) but cannot start from text; "
                "choose an SDXL base checkpoint for txt2img")
        if self.sdxl and r.clip_skip > 1:
            self.warnings.append(f"clip skip {r.clip_skip} is not applied to SDXL models: like A1111 (option "
                                 f"sdxl_clip_l_skip off), their text encoders are read at the penultimate layer")
        self.factor = getattr(self.base, "vae_scale_factor", 8)
        self.vae_ref, self.vae = self._select_vae()
        self.plan = plan_seeds(r)

        session = NetworkSession(
            self.base, e.loras, e.hypernetworks, e.embeddings, self.models.loras, self.models.hypernetworks,
            self.models.embeddings, self.warnings)
        self.session = session
        images: list[Image.Image] = []
        self.image_indices: list[int] = []  # each image's place in the seed plan (skipped batches leave gaps)
        cancelled: Cancelled | None = None
        try:
            t = time.perf_counter()
            session.activate(nets)
            embeddings = session.embeddings_for(self.prompt, self.negative, self.hr_prompt, self.hr_negative)
            self.encoder = PromptEncoder(self.base, clip_skip=r.clip_skip, embeddings=embeddings)
            self.embeddings_available = embeddings
            self.timings["networks"] = time.perf_counter() - t
            passes = 1 + (1 if self.hr_sampler else 0) + (1 if self.refiner else 0)
            self.sink = EventSink(self.on_event, self.should_cancel, e.preview_every, self.sdxl, r.n_iter * passes,
                                  should_skip=self.should_skip)
            t = time.perf_counter()
            inputs = self._prepare_inputs()
            for it in range(r.n_iter):
                self.sink.job_no = it * passes
                seeds, subseeds = self.plan.batch(it, r.batch_size)
                if it > 0 and self.hr_nets is not nets:
                    session.activate(nets)
                try:
                    done = self._iteration(seeds, subseeds, inputs, nets)
                except BatchSkipped:
                    self.warnings.append(f"batch {it + 1} of {r.n_iter} was skipped")
                    continue
                images.extend(done)
                self.image_indices.extend(range(it * r.batch_size, it * r.batch_size + len(done)))
            self.timings["sampling"] = time.perf_counter() - t
        except Cancelled as exc:
            cancelled = exc
        finally:
            session.close()
            for pipe in self._job_pipes():
                pipe.vae = self._own_vae(pipe)
        session.finish_warnings()
        if cancelled is not None:
            cancelled.partial = self._result(images, started) if images else None
            raise cancelled
        return self._result(images, started)

    def _load_refiner(self):
        if self.models.refiner is None:
            self.warnings.append("refiner_switch_at is set but no refiner model was given; the refiner was skipped")
            return None
        ref = self.e.provider.get(self.models.refiner.path, self.models.refiner.sha256)
        if not is_sdxl(self.base) or not is_sdxl(ref):
            raise InvalidRequestError("refiner_checkpoint", "the refiner needs an SDXL base checkpoint and an SDXL "
                                                            f"refiner; {self.models.refiner.name!r} cannot refine this model")
        return ref

    def _select_vae(self) -> tuple[ModelRef | None, Any]:
        ref = self.models.selected_vae()
        if ref is None:
            return None, self.base.vae
        try:
            device, dtype = placement(self.base.vae)
            vae = self.e.vaes.get(ref, like=self.base, device=device, dtype=dtype)
        except PipelineError as exc:
            if isinstance(self.models.vae, ModelRef):
                raise
            self.warnings.append(f"VAE {ref.name!r} could not be loaded ({exc}); using the checkpoint's own VAE")
            return None, self.base.vae
        return ref, vae

    def _own_vae(self, pipe):
        return self.refiner.vae if self.refiner is not None and pipe.unet is self.refiner.unet else self.base.vae

    def _job_pipes(self) -> list:
        pipes = list(self.e._derived.get(self.base, {}).values())
        if self.refiner is not None:
            pipes += list(self.e._derived.get(self.refiner, {}).values())
        return pipes

    def _pipe(self, base, task: Task, variant: str | None = None):
        pipe = self.e.derived(base, task, variant)
        pipe.vae = self.vae
        return pipe

    def _scheduler(self, base, sampler: samplers.ResolvedSampler, seeds: list[int]):
        return samplers.build_scheduler(sampler, self.e.scheduler_config(base), seeds=seeds)

    # -- inputs ---------------------------------------------------------------------------------------
    def _prepare_inputs(self) -> dict[str, Any]:
        r = self.r
        if r.mode == "txt2img":
            return {}
        inits = [decode_image(b, f"init_images[{i}]") for i, b in enumerate(r.init_images)]
        if r.mode == "img2img":
            return {"images": inits}
        mask = decode_image(r.mask, "mask", mode="L")
        if any(img.size != mask.size for img in inits):
            raise InvalidRequestError("mask", f"`mask` size {mask.width}x{mask.height} does not match every init image")
        job = inpaint.prepare(r, expand_for_batch(inits, r.batch_size), mask)
        if job.note:
            self.warnings.append(job.note)
        if r.resize_mode == 3:
            self.warnings.append("resize mode 3 (latent upscale) does not apply to inpainting; images were resized")
        return {"inpaint": job}

    def _white_mask(self, width: int, height: int) -> Image.Image:
        return Image.new("L", (width, height), 255)

    def _encode_images(self, pipe, images: list[Image.Image]) -> torch.Tensor:
        """VAE-encode PIL images (at their own size) to scaled latents (mean of the posterior)."""
        device, dtype = placement(pipe.vae)
        tensor = pipe.image_processor.preprocess(images).to(device=device, dtype=dtype)
        with torch.no_grad():
            latents = pipe.vae.encode(tensor).latent_dist.mode()
        return latents * pipe.vae.config.scaling_factor

    # -- one iteration (batch) --------------------------------------------------------------------------
    def _iteration(self, seeds, subseeds, inputs, nets) -> list[Image.Image]:
        r = self.r
        w, h, f = r.width, r.height, self.factor
        noise, gens = make_noise((4, h // f, w // f), seeds, subseeds, r.subseed_strength, self.plan.resize_from, f)
        nine = self.base.unet.config.in_channels == 9
        conds = self._conds(self.encoder, self.base, self.prompt, self.negative, r.steps, nets)
        latent_next = self.refiner is not None or (self.hr_sampler is not None and hires.is_latent(r.effective_hr_upscaler))
        common = dict(steps=r.steps, cfg_scale=r.cfg_scale, conds=conds, noise=noise, generators=gens, width=w,
                      height=h, eta=r.eta)
        batch = len(seeds)
        if r.mode != "txt2img" and r.denoising_strength == 0:
            return self._unchanged(inputs, batch)
        if r.mode == "txt2img":
            spec = PassSpec(output_type="latent" if latent_next else "pil", **common)
            if nine:  # A1111: inpainting models do txt2img on a blank, fully masked image
                spec = replace(spec, init=InitImage([Image.new("RGB", (w, h), (127, 127, 127))] * batch),
                               mask=InpaintMask(self._white_mask(w, h)))
            if self.refiner is not None:
                spec = replace(spec, denoising_end=r.refiner_switch_at)
            out = self._run(self.base, spec, self.sampler, seeds)
            if self.refiner is not None:
                out = self._refine(out, seeds, gens)
            if self.hr_sampler is not None:
                out = self._hires(out, seeds, subseeds, nets)
            return out
        if r.mode == "img2img":
            images = expand_for_batch(inputs["images"], batch)
            if r.resize_mode == 3 and not nine:
                pipe = self._pipe(self.base, "img2img")
                lat = torch.cat([self._encode_images(pipe, [img.resize((img.width // f * f, img.height // f * f))])
                                 for img in images])
                init = hires.upscale_latents(lat, w, h, "Latent", f)
            else:
                mode = 0 if r.resize_mode == 3 else r.resize_mode
                from pipelines.images import resize_image

                init = [resize_image(mode, img, w, h) for img in images]
            spec = PassSpec(init=InitImage(init, r.denoising_strength),
                            mask=InpaintMask(self._white_mask(w, h)) if nine else None, **common)
            return self._run(self.base, spec, self.sampler, seeds)
        job: inpaint.InpaintJob = inputs["inpaint"]
        lat_mask = inpaint.latent_mask(job.mask, w // f, h // f)
        spec = PassSpec(init=InitImage(job.images[:batch], r.denoising_strength),
                        mask=InpaintMask(job.mask, latent_fill=inpaint.latent_fill(r.inpainting_fill, lat_mask, noise)),
                        **common)
        out = self._run(self.base, spec, self.sampler, seeds)
        return [inpaint.finish(job, img, i) for i, img in enumerate(out)]

    def _unchanged(self, inputs, batch: int) -> list[Image.Image]:
        """Denoising strength 0: nothing is repainted; return the (resized / composited) inputs."""
        from pipelines.images import resize_image

        r = self.r
        if "images" in inputs:
            mode = 0 if r.resize_mode == 3 else r.resize_mode
            return [resize_image(mode, img, r.width, r.height) for img in expand_for_batch(inputs["images"], batch)]
        job: inpaint.InpaintJob = inputs["inpaint"]
        return [inpaint.finish(job, img, i) for i, img in enumerate(job.images[:batch])]

    def _run(self, base, spec: PassSpec, sampler, seeds):
        """Run one pass with the job's controls for it (each control decides whether and how it joins)."""
        target = spec.target
        controls = tuple(c for c in (source.for_pass(target) for source in self.controls) if c is not None)
        spec = replace(spec, controls=controls)
        pipe = self._pipe(base, spec.task, spec.variant)
        return run_pass(pipe, spec, self._scheduler(base, sampler, seeds), self.sink)

    def _refine(self, latents: torch.Tensor, seeds, gens):
        r = self.r
        self.sink.job_no += 1
        encoder = PromptEncoder(self.refiner, clip_skip=r.clip_skip, embeddings={
            k: v for k, v in self.embeddings_available.items() if set(v.vectors) >= {"clip_g"}})
        conds = self._conds(encoder, self.refiner, self.prompt, self.negative, r.steps)
        latent_next = self.hr_sampler is not None and hires.is_latent(r.effective_hr_upscaler)
        spec = PassSpec(steps=r.steps, cfg_scale=r.cfg_scale, conds=conds, noise=latents.cpu().float(),
                        generators=gens, width=r.width, height=r.height, phase="refiner",
                        init=InitImage(latents, 1.0, denoising_start=r.refiner_switch_at), eta=r.eta,
                        output_type="latent" if latent_next else "pil")
        return self._run(self.refiner, spec, self.sampler, seeds)

    def _hires(self, first, seeds, subseeds, nets):
        r = self.r
        self.sink.job_no += 1
        tw, th = r.hr_target_size()
        f = self.factor
        upscaler = r.effective_hr_upscaler
        latent = hires.is_latent(upscaler)
        image = hires.upscale_latents(first, tw, th, upscaler, f) if latent else hires.upscale_images(first, tw, th, upscaler)
        if r.denoising_strength == 0:
            return self._decode(image) if latent else image
        if self.hr_nets is not nets:
            self.session.activate(self.hr_nets)
        n_sched, wanted = hires.second_pass_steps(r)
        noise, gens = make_noise((4, th // f, tw // f), seeds, subseeds, r.subseed_strength, self.plan.resize_from, f)
        conds = self._conds(self.encoder, self.base, self.hr_prompt, self.hr_negative, wanted, self.hr_nets)
        spec = PassSpec(steps=n_sched, cfg_scale=r.cfg_scale, conds=conds, noise=noise,
                        generators=gens, width=tw, height=th, phase="hires",
                        init=InitImage(image, r.denoising_strength), eta=r.eta)
        if self.base.unet.config.in_channels == 9:
            masked_latents = None
            if latent:  # A1111 conditions inpainting models on a blank image when fully masked
                pipe = self._pipe(self.base, "inpaint")
                gray = Image.new("RGB", (tw, th), (127, 127, 127))
                masked_latents = self._encode_images(pipe, [gray]).repeat(len(seeds), 1, 1, 1)
            spec = replace(spec, mask=InpaintMask(self._white_mask(tw, th), masked_image_latents=masked_latents))
        return self._run(self.base, spec, self.hr_sampler, seeds)

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        pipe = self._pipe(self.base, "txt2img")
        vae = pipe.vae
        with torch.no_grad():
            device, dtype = placement(vae)
            decoded = vae.decode(latents.to(device=device, dtype=dtype) / vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(decoded, output_type="pil")

    # -- result ---------------------------------------------------------------------------------------
    def _result(self, images: list[Image.Image], started: float) -> GenerationResult:
        r = self.r
        t = time.perf_counter()
        used_tis = {name: self.models.embeddings[name] for name in sorted(self.used_embeddings)
                    if name in self.models.embeddings}
        facts = JobFacts(
            sampler=self.sampler, hr_sampler=self.hr_sampler, checkpoint=self.models.checkpoint, vae=self.vae_ref,
            refiner=self.models.refiner if self.refiner is not None else None,
            lora_hashes=lora_hashes(self.session.applied_loras), ti_hashes=ti_hashes(used_tis),
            hires_size=r.hr_target_size() if self.hr_sampler else None,
        )
        infotexts, encoded = [], []
        image_seeds = [self.plan.seeds[i] for i in self.image_indices]
        image_subseeds = [self.plan.subseeds[i] for i in self.image_indices]
        for i, image in enumerate(images):
            params = parameters(r, facts, image_seeds[i], image_subseeds[i])
            text = infotext.build(r.prompt, r.negative_prompt, params)
            infotexts.append(text)
            encoded.append(infotext.encode_image(image, text, "png"))
        self.timings["encode"] = time.perf_counter() - t
        self.timings["total"] = time.perf_counter() - started
        width, height = images[0].size if images else (r.width, r.height)
        n = len(images)
        return GenerationResult(
            images=encoded, infotexts=infotexts, seeds=image_seeds, subseeds=image_subseeds,
            prompts=[r.prompt] * n, negative_prompts=[r.negative_prompt] * n, width=width, height=height,
            sampler_name=self.sampler.name, scheduler=self.sampler.schedule_label, steps=r.steps,
            cfg_scale=r.cfg_scale, clip_skip=r.clip_skip, model_name=self.models.checkpoint.stem,
            model_hash=self.models.checkpoint.short_hash,
            vae_name=self.vae_ref.stem if self.vae_ref else None,
            vae_hash=self.vae_ref.short_hash if self.vae_ref else None,
            version=infotext.VERSION, warnings=list(dict.fromkeys(self.warnings)), timings=self.timings,
        )
