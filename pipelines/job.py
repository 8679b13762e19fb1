"""One ``Engine.generate`` call, read top to bottom as numbered steps (diffusers' ``__call__`` is the model).

``GenerationRequest.validate`` has already checked what needs no model; ``check_inputs`` checks what
depends on the loaded models. Every mode runs through the same steps: its ``Source`` gives the first pass
its inputs, the SDXL refiner and the hires fix follow a pass that started from text, and every pass goes
through ``Job._run``, which adapts it to an inpainting checkpoint and adds the job's controls for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from pipelines import hires, infotext, samplers
from pipelines.conditioning import Conditioning, PromptEncoder, pad_to_chunks
from pipelines.errors import PipelineError
from pipelines.networks.lora import is_sdxl
from pipelines.networks.session import NetworkSession, lora_hashes, ti_hashes
from pipelines.passes import ControlSource, InitImage, InpaintMask, PassSpec, Task
from pipelines.prompts import ExtraNetworks, join_and, parse_extra_networks, prompt_schedule
from pipelines.results import JobFacts, parameters
from pipelines.sampling import CondSchedule, EventSink, placement
from pipelines.seeds import SeedPlan, make_noise, plan_seeds
from pipelines.sources import Source, prepare_source
from pipelines.types import (
    BatchSkipped,
    Cancelled,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    ModelRef,
    Progress,
    ResolvedModels,
)

if TYPE_CHECKING:
    from pipelines.engine import Engine

logger = logging.getLogger(__name__)

_GRAY = (127, 127, 127)  # A1111's blank image for inpainting models with nothing to keep


def check_inputs(request: GenerationRequest, models: ResolvedModels, base: Any, refiner: Any,
                 warnings: list[str]) -> None:
    """The checks that need the loaded models (``request.validate()`` did the rest without them)."""
    if refiner is not None and not (is_sdxl(base) and is_sdxl(refiner)):
        raise InvalidRequestError("refiner_checkpoint", "the refiner needs an SDXL base checkpoint and an SDXL "
                                                        f"refiner; {models.refiner.name!r} cannot refine this model")
    sdxl = is_sdxl(base)
    if request.mode == "txt2img" and sdxl and getattr(base, "text_encoder", None) is None:
        raise InvalidRequestError(
            "sd_model_checkpoint", f"{models.checkpoint.name!r} is an SDXL refiner: it refines images "
            "(img2img, inpaint, or as `refiner_checkpoint` after an SDXL base) but cannot start from text; "
            "choose an SDXL base checkpoint for txt2img")
    if sdxl and request.clip_skip > 1:
        warnings.append(f"clip skip {request.clip_skip} is not applied to SDXL models: like A1111 (option "
                        f"sdxl_clip_l_skip off), their text encoders are read at the penultimate layer")


@dataclass(frozen=True)
class JobPrompts:
    """The prompts with extra-network tags removed, and the networks the first and hires passes use."""

    prompt: str
    negative: str
    nets: ExtraNetworks
    hr_prompt: str
    hr_negative: str
    hr_nets: ExtraNetworks


class Job:
    """The state one ``generate`` call shares between its steps and passes."""

    def __init__(self, engine: Engine, request: GenerationRequest, models: ResolvedModels, *,
                 on_event: Callable[[Progress], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 should_skip: Callable[[], bool] | None = None,
                 controls: Sequence[ControlSource] = (),
                 infotext_params: Mapping[str, str] | None = None) -> None:
        self.engine = engine
        self.request = request
        self.models = models
        self.on_event = on_event
        self.should_cancel = should_cancel
        self.should_skip = should_skip
        self.controls = tuple(controls)
        self.infotext_params = dict(infotext_params or {})
        self.warnings: list[str] = []
        self.timings: dict[str, float] = {}
        self.used_embeddings: set[str] = set()
        self._cond_cache: dict[tuple[int, int, str], Conditioning] = {}
        # set by the steps of ``run``, in order
        self.sampler: samplers.ResolvedSampler | None = None
        self.hr_sampler: samplers.ResolvedSampler | None = None
        self.prompts: JobPrompts | None = None
        self.base: Any = None
        self.refiner: Any = None
        self.factor = 8
        self.vae_ref: ModelRef | None = None
        self.vae: Any = None
        self.plan: SeedPlan | None = None
        self.session: NetworkSession | None = None
        self.embeddings_available: dict[str, Any] = {}
        self.encoder: PromptEncoder | None = None
        self.sink: EventSink | None = None
        self.source: Source | None = None
        self.image_indices: list[int] = []  # each image's place in the seed plan (skipped batches leave gaps)

    def run(self) -> GenerationResult:
        request = self.request
        started = time.perf_counter()

        # 1. Resolve the samplers and read the prompts (no model needed)
        self.sampler, self.hr_sampler = self._resolve_samplers()
        self.prompts = self._read_prompts()

        # 2. Load the models
        t = time.perf_counter()
        self.base, self.refiner = self._load_models()
        self.timings["load"] = time.perf_counter() - t

        # 3. Check the inputs against the models
        check_inputs(request, self.models, self.base, self.refiner, self.warnings)

        # 4. Choose the VAE and plan the seeds
        self.factor = getattr(self.base, "vae_scale_factor", 8)
        self.vae_ref, self.vae = self._select_vae()
        self.plan = plan_seeds(request)

        images: list[Image.Image] = []
        cancelled: Cancelled | None = None
        self.session = NetworkSession(
            self.base, self.engine.loras, self.engine.hypernetworks, self.engine.embeddings, self.models.loras,
            self.models.hypernetworks, self.models.embeddings, self.warnings)
        try:
            # 5. Activate the networks and build the prompt encoder
            t = time.perf_counter()
            self._encode_setup()
            self.timings["networks"] = time.perf_counter() - t

            # 6. Prepare the input images
            passes = 1 + (1 if self.hr_sampler else 0) + (1 if self.refiner else 0)
            self.sink = EventSink(self.on_event, self.should_cancel, self.engine.preview_every, is_sdxl(self.base),
                                  request.n_iter * passes, should_skip=self.should_skip)
            t = time.perf_counter()
            self.source = prepare_source(request, self.factor, self.warnings)

            # 7. Denoise batch after batch
            for iteration in range(request.n_iter):
                self.sink.job_no = iteration * passes
                seeds, subseeds = self.plan.batch(iteration, request.batch_size)
                if iteration > 0 and self.prompts.hr_nets is not self.prompts.nets:
                    self.session.activate(self.prompts.nets)
                try:
                    done = self._batch(seeds, subseeds)
                except BatchSkipped:
                    self.warnings.append(f"batch {iteration + 1} of {request.n_iter} was skipped")
                    continue
                images.extend(done)
                start = iteration * request.batch_size
                self.image_indices.extend(range(start, start + len(done)))
            self.timings["sampling"] = time.perf_counter() - t
        except Cancelled as exc:
            cancelled = exc
        finally:
            # 8. Leave the provider's pipelines as they were
            self.session.close()
            for pipe in self._job_pipes():
                self.engine.restore(pipe, self._own_vae(pipe))
        self.session.finish_warnings()

        # 9. Build the result (the images finished before a cancel are its partial result)
        if cancelled is not None:
            cancelled.partial = self._result(images, started) if images else None
            raise cancelled
        return self._result(images, started)

    # -- steps 1-5 --------------------------------------------------------------------------------------
    def _resolve_samplers(self) -> tuple[samplers.ResolvedSampler, samplers.ResolvedSampler | None]:
        r = self.request
        sampler = samplers.resolve(r.sampler_name, r.scheduler)
        hr_sampler = None
        if r.mode == "txt2img" and r.enable_hr:
            hr_sampler = samplers.resolve(r.hr_sampler_name or r.sampler_name, r.hr_scheduler or r.scheduler,
                                          field_name="hr_sampler_name")
        for chosen in (sampler, hr_sampler):
            if chosen is not None and chosen.sampler.note:  # no exact diffusers equivalent: say what ran instead
                self.warnings.append(f"sampler {chosen.name} ran as the {chosen.sampler.note}")
        if r.eta is not None and sampler.name != "DDIM":
            self.warnings.append(f"eta is only used by the DDIM sampler here; ignored for {sampler.name}")
        return sampler, hr_sampler

    def _read_prompts(self) -> JobPrompts:
        r = self.request
        prompt, nets = self._clean(r.prompt, "prompt")
        negative, neg_nets = self._clean(r.negative_prompt, "negative prompt")
        if neg_nets:
            self.warnings.append("extra networks in the negative prompt are ignored")
        hr_prompt, hr_nets, hr_negative = prompt, nets, negative
        if r.enable_hr and r.hr_prompt:
            hr_prompt, hr_nets = self._clean(r.hr_prompt, "hires prompt")
        if r.enable_hr and r.hr_negative_prompt:
            hr_negative, _ = self._clean(r.hr_negative_prompt, "hires negative prompt")
        return JobPrompts(prompt, negative, nets, hr_prompt, hr_negative, hr_nets)

    def _clean(self, text: str, what: str) -> tuple[str, ExtraNetworks]:
        clean, nets = parse_extra_networks(text)
        for kind in nets.unknown:
            self.warnings.append(f"unknown extra network type {kind!r} in the {what}; ignored")
        clean, had_and = join_and(clean)
        if had_and:
            self.warnings.append(f"composable diffusion (AND) is not supported; the sub-prompts of the {what} "
                                 f"were encoded as separate chunks")
        return clean, nets

    def _load_models(self) -> tuple[Any, Any]:
        checkpoint, provider = self.models.checkpoint, self.engine.provider
        base = provider.get(checkpoint.path, checkpoint.sha256)
        unet_device, _ = placement(base.unet)
        if unet_device.type != self.engine.device.type:
            logger.warning("provider returned %s on %s but the engine runs on %s", checkpoint.name, unet_device,
                           self.engine.device)
        if self.request.refiner_switch_at is None:
            return base, None
        if self.models.refiner is None:
            self.warnings.append("refiner_switch_at is set but no refiner model was given; the refiner was skipped")
            return base, None
        return base, provider.get(self.models.refiner.path, self.models.refiner.sha256)

    def _select_vae(self) -> tuple[ModelRef | None, Any]:
        ref = self.models.selected_vae()
        if ref is None:
            return None, self.base.vae
        try:
            device, dtype = placement(self.base.vae)
            vae = self.engine.vaes.get(ref, like=self.base, device=device, dtype=dtype)
        except PipelineError as exc:
            if isinstance(self.models.vae, ModelRef):
                raise
            self.warnings.append(f"VAE {ref.name!r} could not be loaded ({exc}); using the checkpoint's own VAE")
            return None, self.base.vae
        return ref, vae

    def _encode_setup(self) -> None:
        prompts = self.prompts
        self.session.activate(prompts.nets)
        self.embeddings_available = self.session.embeddings_for(prompts.prompt, prompts.negative, prompts.hr_prompt,
                                                                prompts.hr_negative)
        self.encoder = PromptEncoder(self.base, clip_skip=self.request.clip_skip,
                                     embeddings=self.embeddings_available)

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

    # -- step 7: one batch ------------------------------------------------------------------------------
    def _batch(self, seeds: list[int], subseeds: list[int]) -> list[Image.Image]:
        r, f, prompts = self.request, self.factor, self.prompts
        noise, gens = make_noise((4, r.height // f, r.width // f), seeds, subseeds, r.subseed_strength,
                                 self.plan.resize_from, f)
        conds = self._conds(self.encoder, self.base, prompts.prompt, prompts.negative, r.steps, prompts.nets)
        batch = len(seeds)
        if r.denoising_strength == 0 and (kept := self.source.unchanged(batch)) is not None:
            return kept
        follow_up = self.source.starts_from_text
        refine = follow_up and self.refiner is not None
        latent_next = refine or (follow_up and self.hr_sampler is not None and hires.is_latent(r.effective_hr_upscaler))
        init, mask = self.source.first_pass(batch, noise, self._encode_for_img2img, self._inpainting(self.base))
        spec = PassSpec(steps=r.steps, cfg_scale=r.cfg_scale, conds=conds, noise=noise, generators=gens, width=r.width,
                        height=r.height, init=init, mask=mask, eta=r.eta,
                        denoising_end=r.refiner_switch_at if refine else None,
                        output_type="latent" if latent_next else "pil")
        out = self._run(self.base, spec, self.sampler, seeds)
        if refine:
            out = self._refine(out, seeds, gens)
        if follow_up and self.hr_sampler is not None:
            out = self._hires(out, seeds, subseeds)
        return self.source.finish(out)

    def _refine(self, latents: torch.Tensor, seeds: list[int], gens: list[torch.Generator]):
        r = self.request
        self.sink.job_no += 1
        encoder = PromptEncoder(self.refiner, clip_skip=r.clip_skip, embeddings={
            k: v for k, v in self.embeddings_available.items() if set(v.vectors) >= {"clip_g"}})
        conds = self._conds(encoder, self.refiner, self.prompts.prompt, self.prompts.negative, r.steps)
        latent_next = self.hr_sampler is not None and hires.is_latent(r.effective_hr_upscaler)
        spec = PassSpec(steps=r.steps, cfg_scale=r.cfg_scale, conds=conds, noise=latents.cpu().float(),
                        generators=gens, width=r.width, height=r.height, phase="refiner",
                        init=InitImage(latents, 1.0, denoising_start=r.refiner_switch_at), eta=r.eta,
                        output_type="latent" if latent_next else "pil")
        return self._run(self.refiner, spec, self.sampler, seeds)

    def _hires(self, first, seeds: list[int], subseeds: list[int]):
        r, f, prompts = self.request, self.factor, self.prompts
        self.sink.job_no += 1
        tw, th = r.hr_target_size()
        upscaler = r.effective_hr_upscaler
        latent = hires.is_latent(upscaler)
        image = hires.upscale_latents(first, tw, th, upscaler, f) if latent else hires.upscale_images(first, tw, th, upscaler)
        if r.denoising_strength == 0:
            return self._decode(image) if latent else image
        if prompts.hr_nets is not prompts.nets:
            self.session.activate(prompts.hr_nets)
        n_sched, wanted = hires.second_pass_steps(r)
        noise, gens = make_noise((4, th // f, tw // f), seeds, subseeds, r.subseed_strength, self.plan.resize_from, f)
        conds = self._conds(self.encoder, self.base, prompts.hr_prompt, prompts.hr_negative, wanted, prompts.hr_nets)
        spec = PassSpec(steps=n_sched, cfg_scale=r.cfg_scale, conds=conds, noise=noise, generators=gens, width=tw,
                        height=th, phase="hires", init=InitImage(image, r.denoising_strength), eta=r.eta)
        return self._run(self.base, spec, self.hr_sampler, seeds)

    # -- every pass -------------------------------------------------------------------------------------
    def _run(self, model, spec: PassSpec, sampler: samplers.ResolvedSampler, seeds: list[int]):
        """Run one pass: adapted to an inpainting model, with the job's controls for it."""
        if self._inpainting(model):
            spec = self._for_inpainting_model(model, spec)
        target = spec.target
        controls = tuple(c for c in (source.for_pass(target) for source in self.controls) if c is not None)
        spec = replace(spec, controls=controls)
        if controls and spec.mask is not None and spec.init.is_latent:
            # diffusers' ControlNet inpaint pipelines take the init as pixels (and no masked-image latents)
            spec = replace(spec, init=replace(spec.init, image=self._decode(spec.init.image)),
                           mask=replace(spec.mask, masked_image_latents=None))
        return self.engine.sample(model, spec, sampler, seeds, self.sink, self.vae)

    @staticmethod
    def _inpainting(model) -> bool:
        return model.unet.config.in_channels == 9

    def _for_inpainting_model(self, model, spec: PassSpec) -> PassSpec:
        """A1111: inpainting models run every pass inpainting, fully masked where the pass has no mask, from a
        blank image where it has none (as pixels, or as the masked-image latents beside latent init)."""
        if spec.mask is not None:
            return spec
        batch, size = spec.noise.shape[0], (spec.width, spec.height)
        gray = Image.new("RGB", size, _GRAY)
        if spec.init is None:
            return replace(spec, init=InitImage([gray] * batch), mask=InpaintMask(_white_mask(size)))
        masked_latents = None
        if spec.init.is_latent:
            masked_latents = self._encode(self._pipe(model, "inpaint"), [gray]).repeat(batch, 1, 1, 1)
        return replace(spec, mask=InpaintMask(_white_mask(size), masked_image_latents=masked_latents))

    def _pipe(self, model, task: Task):
        return self.engine.pipeline(model, task, self.vae)

    def _encode_for_img2img(self, images: list[Image.Image]) -> torch.Tensor:
        return self._encode(self._pipe(self.base, "img2img"), images)

    @staticmethod
    def _encode(pipe, images: list[Image.Image]) -> torch.Tensor:
        """VAE-encode PIL images (at their own size) to scaled latents (mean of the posterior)."""
        device, dtype = placement(pipe.vae)
        tensor = pipe.image_processor.preprocess(images).to(device=device, dtype=dtype)
        with torch.no_grad():
            latents = pipe.vae.encode(tensor).latent_dist.mode()
        return latents * pipe.vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        pipe = self._pipe(self.base, "txt2img")
        vae = pipe.vae
        with torch.no_grad():
            device, dtype = placement(vae)
            decoded = vae.decode(latents.to(device=device, dtype=dtype) / vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(decoded, output_type="pil")

    # -- steps 8-9 --------------------------------------------------------------------------------------
    def _own_vae(self, pipe):
        return self.refiner.vae if self.refiner is not None and pipe.unet is self.refiner.unet else self.base.vae

    def _job_pipes(self) -> list:
        pipes = self.engine.derived_pipelines(self.base)
        if self.refiner is not None:
            pipes += self.engine.derived_pipelines(self.refiner)
        return pipes

    def _result(self, images: list[Image.Image], started: float) -> GenerationResult:
        r = self.request
        t = time.perf_counter()
        used_tis = {name: self.models.embeddings[name] for name in sorted(self.used_embeddings)
                    if name in self.models.embeddings}
        facts = JobFacts(
            sampler=self.sampler, hr_sampler=self.hr_sampler, checkpoint=self.models.checkpoint, vae=self.vae_ref,
            refiner=self.models.refiner if self.refiner is not None else None,
            lora_hashes=lora_hashes(self.session.applied_loras), ti_hashes=ti_hashes(used_tis),
            hires_size=r.hr_target_size() if self.hr_sampler else None, extra=self.infotext_params,
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


def _white_mask(size: tuple[int, int]) -> Image.Image:
    return Image.new("L", size, 255)
