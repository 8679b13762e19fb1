"""The LoRA training loop: one readable pass in the order of diffusers' train_text_to_image_lora.py.

1. read the dataset (kohya layout, buckets) and load the base checkpoint with the product loader;
2. freeze everything, add peft LoRA adapters to the UNet (and text encoders unless unet-only);
3. encode every image once with the VAE (cached latents);
4. per step: noise + a random DDPM timestep, predict noise (or v), MSE, AdamW, lr schedule, clip;
5. every N epochs: an epoch LoRA in kohya format, resumable state (state.pt), sample images.

The trainer reports through `on_event` (dicts that are the CLI's JSON lines) and asks `should_stop`
after every step, so it knows nothing of processes, signals or jobs. Resuming restores LoRA weights,
optimizer, lr schedule and the noise generator, and the batch order depends only on (seed, epoch):
a resumed run ends with the same tensors as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.config import TrainingConfig
from training.dataset import DatasetError, Sample, TrainingSet, load_pixels, shuffle_caption
from training.runfile import RunSpec

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
EventSink = Callable[[dict[str, Any]], None]


class TrainingInputError(ValueError):
    """The run cannot start: bad dataset, base model or state. `field` names the run/config key."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class Stopped(Exception):
    """`should_stop` answered true; the last saved epoch is intact."""


@dataclass
class _Cached:
    """What one image contributes to a step: its latents (or pixels) and SDXL's size conditioning."""

    latents: torch.Tensor | None  # [4, h, w] scaled latents, when cached
    flipped: torch.Tensor | None  # the same for the mirrored image (flip_aug)
    crop: tuple[int, int]  # (top, left)


class Trainer:
    """Trains one LoRA as `run` and `config` say. Call `run()` once."""

    def __init__(self, run: RunSpec, config: TrainingConfig, *, on_event: EventSink | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        if run.base_type != config.base_type:
            raise TrainingInputError(f"config is for {config.base_type}, run is {run.base_type}", "base_type")
        self.run_spec = run
        self.config = config
        self.on_event = on_event or (lambda event: None)
        self.should_stop = should_stop or (lambda: False)
        self.device = torch.device(run.device)
        mixed = config.mixed_precision if self.device.type == "cuda" else "no"
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed]
        self.is_sdxl = run.base_type == "sdxl"
        self.started_at = time.time()
        self.session_id = int.from_bytes(os.urandom(4), "big")  # one ss_session_id for every file of the run
        self._token_cache: dict[int, dict[str, torch.Tensor]] = {}

    # ---- 1. data and model ----

    def _read_dataset(self) -> TrainingSet:
        c = self.config
        try:
            return TrainingSet.from_folder(
                self.run_spec.train_data_dir, resolution=c.resolution, enable_bucket=c.enable_bucket,
                min_bucket_reso=c.min_bucket_reso, max_bucket_reso=c.max_bucket_reso,
                bucket_reso_steps=c.bucket_reso_steps, caption_extension=c.caption_extension)
        except DatasetError as exc:
            raise TrainingInputError(f"dataset: {exc.message}", "train_data_dir") from None

    def _load_pipeline(self) -> Any:
        from pipelines.errors import PipelineError
        from pipelines.loader import load_checkpoint

        try:
            pipe = load_checkpoint(self.run_spec.base_model, device=self.device, dtype=self.weight_dtype,
                                   skeleton_dirs=self.run_spec.skeleton_dirs)
        except (PipelineError, FileNotFoundError) as exc:
            raise TrainingInputError(f"base model: {exc}", "base_model") from None
        kind = type(pipe).__name__
        expected = "StableDiffusionXLPipeline" if self.is_sdxl else "StableDiffusionPipeline"
        if kind != expected or pipe.unet.config.in_channels != 4:
            raise TrainingInputError(f"base model {self.run_spec.base_model.name} loads as {kind} "
                                     f"(in_channels {pipe.unet.config.in_channels}); base_type "
                                     f"{self.run_spec.base_type} needs a {expected} txt2img checkpoint", "base_type")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _text_encoders(self) -> list[torch.nn.Module]:
        pipe = self.pipe
        return [pipe.text_encoder, pipe.text_encoder_2] if self.is_sdxl else [pipe.text_encoder]

    # ---- 2. adapters ----

    def _add_adapters(self) -> list[dict[str, Any]]:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        from training.export import text_encoder_lora_targets, unet_lora_targets

        c, pipe = self.config, self.pipe
        for module in [pipe.unet, pipe.vae, *self._text_encoders()]:
            module.requires_grad_(False)
        pipe.vae.to(dtype=torch.float32)  # encoded once; fp16 VAEs overflow (SDXL)
        torch.manual_seed(c.seed)  # the gaussian init of lora_A
        lora = dict(r=c.network_dim, lora_alpha=c.network_alpha, init_lora_weights="gaussian")
        pipe.unet.add_adapter(LoraConfig(**lora, target_modules=unet_lora_targets(self.run_spec.base_type)))
        self.trained: dict[str, torch.nn.Module] = {"unet": pipe.unet}
        if c.train_text_encoder:
            for name, encoder in zip(("text_encoder", "text_encoder_2"), self._text_encoders(), strict=False):
                encoder.add_adapter(LoraConfig(**lora, target_modules=text_encoder_lora_targets()))
                self.trained[name] = encoder
        cast_training_params(list(self.trained.values()), dtype=torch.float32)
        if c.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            if c.train_text_encoder:
                for encoder in self._text_encoders():
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        groups = [{"params": [p for p in pipe.unet.parameters() if p.requires_grad], "lr": c.unet_lr}]
        if c.train_text_encoder:
            params = [p for m in self._text_encoders() for p in m.parameters() if p.requires_grad]
            groups.append({"params": params, "lr": c.text_encoder_lr})
        return groups

    # ---- 3. latents ----

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(self.device)
        latents = dist.mean + dist.std * noise
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.weight_dtype)

    def _cache_latents(self) -> list[_Cached]:
        c, data = self.config, self.dataset
        generator = torch.Generator().manual_seed(c.seed)
        cached = []
        for item, bucket in zip(data.items, data.item_buckets, strict=True):
            pixels, crop = load_pixels(item, bucket)
            if not c.cache_latents:
                cached.append(_Cached(None, None, crop))
                continue
            latents = self._encode(pixels[None], generator)[0]
            flipped = None
            if c.flip_aug:
                flipped = self._encode(load_pixels(item, bucket, flip=True)[0][None], generator)[0]
            cached.append(_Cached(latents, flipped, crop))
        logger.info("%s latents for %d images in %d buckets", "cached" if c.cache_latents else "no cached",
                    len(cached), len(set(data.item_buckets)))
        return cached

    def _batch_latents(self, batch: list[Sample], generator: torch.Generator) -> torch.Tensor:
        out = []
        for sample in batch:
            flip = self.config.flip_aug and bool(torch.randint(0, 2, (1,), generator=generator).item())
            entry = self.cache[sample.index]
            if entry.latents is not None:
                out.append(entry.flipped if flip else entry.latents)
            else:
                pixels, _ = load_pixels(self.dataset.items[sample.index], sample.bucket, flip=flip)
                out.append(self._encode(pixels[None], generator)[0])
        return torch.stack(out).to(self.device)

    # ---- 4. text conditioning ----

    def _tokens(self, tokenizer: Any, captions: list[str]) -> torch.Tensor:
        # Captions repeat every epoch: tokenise each once (shuffled captions are new strings each time).
        cache = self._token_cache.setdefault(id(tokenizer), {}) if not self.config.shuffle_caption else {}
        missing = [c for c in dict.fromkeys(captions) if c not in cache]
        if missing:
            ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            cache.update(zip(missing, ids, strict=True))
        return torch.stack([cache[c] for c in captions]).to(self.device)

    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        pipe, clip_skip = self.pipe, self.config.clip_skip or 1
        if not self.is_sdxl:
            out = pipe.text_encoder(self._tokens(pipe.tokenizer, captions), output_hidden_states=True)
            if clip_skip == 1:
                return out.last_hidden_state, None
            # A1111 / kohya clip skip: an earlier layer, through the final layer norm.
            text_model = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
            return text_model.final_layer_norm(out.hidden_states[-clip_skip]), None
        # SDXL: the penultimate layer of both encoders, and the projected pooled output of the second.
        out1 = pipe.text_encoder(self._tokens(pipe.tokenizer, captions), output_hidden_states=True)
        out2 = pipe.text_encoder_2(self._tokens(pipe.tokenizer_2, captions), output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return hidden, out2.text_embeds

    def _time_ids(self, batch: list[Sample]) -> torch.Tensor:
        rows = []
        for sample in batch:
            width, height = self.dataset.items[sample.index].size
            top, left = self.cache[sample.index].crop
            rows.append([height, width, top, left, sample.bucket.height, sample.bucket.width])
        return torch.tensor(rows, dtype=self.weight_dtype, device=self.device)

    def _captions(self, batch: list[Sample], generator: torch.Generator) -> list[str]:
        captions = [self.dataset.items[s.index].caption for s in batch]
        if self.config.shuffle_caption:
            captions = [shuffle_caption(c, self.config.keep_tokens, generator) for c in captions]
        return captions

    # ---- the loop ----

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.weight_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.weight_dtype)

    def _loss(self, batch: list[Sample], generator: torch.Generator) -> torch.Tensor:
        c, scheduler = self.config, self.noise_scheduler
        latents = self._batch_latents(batch, generator)
        noise = torch.randn(latents.shape, generator=generator)
        if c.noise_offset:
            noise += c.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        noise = noise.to(self.device, latents.dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),),
                                  generator=generator).to(self.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        captions = self._captions(batch, generator)
        with self._autocast(), torch.set_grad_enabled(True):
            with contextlib.nullcontext() if self.config.train_text_encoder else torch.no_grad():
                hidden, pooled = self._encode_text(captions)
            added = {"text_embeds": pooled, "time_ids": self._time_ids(batch)} if self.is_sdxl else None
            prediction = self.pipe.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")

    def run(self) -> dict[str, Any]:
        """Train to the end; returns the `done` event. Raises TrainingInputError, Stopped."""
        c, run = self.config, self.run_spec
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        from training.metadata import base_model_hashes

        self.dataset = self._read_dataset()
        steps_per_epoch = self.dataset.batches_per_epoch(c.train_batch_size)
        total_steps = c.max_train_epochs * steps_per_epoch
        if c.max_train_steps:
            total_steps = min(total_steps, c.max_train_steps)
        epochs = math.ceil(total_steps / steps_per_epoch)
        self.pipe = self._load_pipeline()
        self.model_hashes = base_model_hashes(run.base_model)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        groups = self._add_adapters()
        if c.optimizer_type == "SGD":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, momentum=0.9)
        else:
            optimizer = torch.optim.AdamW(groups)
        lr_scheduler = get_scheduler(c.lr_scheduler, optimizer, num_warmup_steps=c.lr_warmup_steps,
                                     num_training_steps=total_steps)
        scaler = torch.amp.GradScaler("cuda", enabled=self.weight_dtype == torch.float16)
        generator = torch.Generator()
        generator.manual_seed(c.seed)
        losses: deque[float] = deque(maxlen=steps_per_epoch)
        epoch = step = 0
        state_path = run.state_dir / "state.pt"
        if state_path.is_file():
            epoch, step = self._load_state(state_path, optimizer, lr_scheduler, scaler, generator, losses)
        self.cache = self._cache_latents()
        self.on_event({"event": "start", "total_steps": total_steps, "epochs": epochs,
                       "steps_per_epoch": steps_per_epoch, "resumed_epoch": epoch, "images": self.dataset.num_images})
        params = [p for g in groups for p in g["params"]]
        for module in self.trained.values():
            module.train()
        while epoch < epochs and step < total_steps:
            for batch in self.dataset.epoch_batches(epoch, c.train_batch_size, c.seed):
                if step >= total_steps:
                    break
                if self.should_stop():
                    raise Stopped(f"stopped at step {step}")
                loss = self._loss(batch, generator)
                scaler.scale(loss).backward()
                if c.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(loss.item())
                self.on_event({"event": "step", "step": step, "total": total_steps, "epoch": epoch + 1,
                               "loss": losses[-1], "loss_avg": sum(losses) / len(losses),
                               "lr": lr_scheduler.get_last_lr()[0]})
            epoch += 1
            if epoch < epochs and c.save_every_n_epochs and epoch % c.save_every_n_epochs == 0:
                lora = self._save_lora(run.output_dir / f"{c.output_name}-{epoch:06d}.safetensors", epoch, step,
                                       epochs, total_steps, steps_per_epoch)
                self._save_state(state_path, epoch, step, optimizer, lr_scheduler, scaler, generator, losses)
                self.on_event({"event": "saved", "epoch": epoch, "step": step, "lora": str(lora),
                               "state": str(state_path)})
            if c.sample_every_n_epochs and c.sample_prompts and (epoch % c.sample_every_n_epochs == 0
                                                                 or epoch == epochs):
                self._sample(epoch)
        final = self._save_lora(run.output_dir / f"{c.output_name}.safetensors", epoch, step, epochs, total_steps,
                                steps_per_epoch)
        done = {"event": "done", "lora": str(final), "step": step, "epoch": epoch}
        self.on_event(done)
        return done

    # ---- 5. saving, state, samples ----

    def _save_lora(self, path: Path, epoch: int, step: int, epochs: int, total_steps: int,
                   steps_per_epoch: int) -> Path:
        from training.export import save_lora
        from training.metadata import RunFacts, build_metadata

        c, data = self.config, self.dataset
        facts = RunFacts(
            base_type=c.base_type, output_name=c.output_name, network_dim=c.network_dim,
            network_alpha=c.network_alpha, resolution=c.resolution, num_epochs=epochs, epoch=epoch, steps=step,
            max_train_steps=total_steps, num_train_images=data.num_images, num_batches_per_epoch=steps_per_epoch,
            train_batch_size=c.train_batch_size, learning_rate=c.unet_lr, unet_lr=c.unet_lr,
            text_encoder_lr=c.text_encoder_lr if c.train_text_encoder else None,
            network_train_unet_only=not c.train_text_encoder, lr_scheduler=c.lr_scheduler,
            lr_warmup_steps=c.lr_warmup_steps, optimizer=c.optimizer_type, max_grad_norm=c.max_grad_norm,
            mixed_precision=c.mixed_precision if self.weight_dtype != torch.float32 else "no",
            gradient_checkpointing=c.gradient_checkpointing, cache_latents=c.cache_latents, seed=c.seed,
            clip_skip=c.clip_skip, noise_offset=c.noise_offset or None, enable_bucket=c.enable_bucket,
            min_bucket_reso=c.min_bucket_reso, max_bucket_reso=c.max_bucket_reso,
            bucket_info=_bucket_info(data), flip_aug=c.flip_aug, shuffle_caption=c.shuffle_caption,
            keep_tokens=c.keep_tokens, tag_frequency=data.tag_frequency(), dataset_dirs=data.dataset_dirs(),
            sd_model_name=self.run_spec.base_model.name, sd_model_hash=self.model_hashes[0],
            new_sd_model_hash=self.model_hashes[1], training_started_at=self.started_at,
            session_id=self.session_id,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        encoders = [self.trained[n] for n in ("text_encoder", "text_encoder_2") if n in self.trained]
        save_lora(path, unet=self.pipe.unet, text_encoders=encoders, base=c.base_type,
                  network_alpha=c.network_alpha, metadata=build_metadata(facts))
        logger.info("saved %s (epoch %d, step %d)", path.name, epoch, step)
        return path

    def _lora_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        from peft import get_peft_model_state_dict

        return {name: {k: v.detach().cpu() for k, v in get_peft_model_state_dict(module).items()}
                for name, module in self.trained.items()}

    def _save_state(self, path: Path, epoch: int, step: int, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                    scaler: torch.amp.GradScaler, generator: torch.Generator, losses: deque[float]) -> None:
        state = {
            "format": STATE_FORMAT, "epoch": epoch, "step": step, "lora": self._lora_weights(),
            "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict(), "generator": generator.get_state(), "losses": list(losses),
            "config": json.dumps(self.config.to_dict(), sort_keys=True), "base_type": self.config.base_type,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(state, partial)
        partial.replace(path)

    def _load_state(self, path: Path, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                    scaler: torch.amp.GradScaler, generator: torch.Generator, losses: deque[float]) -> tuple[int, int]:
        from peft import set_peft_model_state_dict

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file: name it and stop, do not train from scratch silently
            raise TrainingInputError(f"state {path} cannot be read ({exc})", "state_dir") from None
        if state.get("format") != STATE_FORMAT or state.get("base_type") != self.config.base_type:
            raise TrainingInputError(f"state {path} is not a {self.config.base_type} state of this trainer",
                                     "state_dir")
        if set(state["lora"]) != set(self.trained):
            raise TrainingInputError(f"state {path} trained {sorted(state['lora'])}, this config trains "
                                     f"{sorted(self.trained)}", "network_train_unet_only")
        for name, module in self.trained.items():
            result = set_peft_model_state_dict(module, state["lora"][name])
            if getattr(result, "unexpected_keys", None):
                raise TrainingInputError(f"state {path} does not fit this network ({name})", "network_dim")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:
            raise TrainingInputError(f"state {path} does not fit this network ({exc})", "network_dim") from None
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        losses.extend(state["losses"])
        logger.info("resuming after epoch %d (step %d) from %s", state["epoch"], state["step"], path)
        return int(state["epoch"]), int(state["step"])

    def _sample_embeds(self, prompt: str, negative: str) -> dict[str, torch.Tensor]:
        hidden, pooled = self._encode_text([prompt])
        negative_hidden, negative_pooled = self._encode_text([negative])
        if not self.is_sdxl:
            return {"prompt_embeds": hidden, "negative_prompt_embeds": negative_hidden}
        if not negative and self.pipe.config.get("force_zeros_for_empty_prompt", True):
            negative_hidden, negative_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
        return {"prompt_embeds": hidden, "negative_prompt_embeds": negative_hidden, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}

    @torch.no_grad()
    def _sample(self, epoch: int) -> None:
        c, pipe = self.config, self.pipe
        folder = self.run_spec.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for module in self.trained.values():
            module.eval()
        try:
            for index, prompt in enumerate(c.sample_prompts):
                generator = torch.Generator(self.device).manual_seed(c.seed if prompt.seed is None else prompt.seed)
                with self._autocast():
                    # The conditioning the LoRA was trained with (clip skip included), not the pipeline's own.
                    image = pipe(**self._sample_embeds(prompt.prompt, prompt.negative_prompt),
                                 width=prompt.width or c.resolution[0], height=prompt.height or c.resolution[1],
                                 num_inference_steps=prompt.steps, guidance_scale=prompt.guidance_scale,
                                 generator=generator).images[0]
                path = folder / f"{c.output_name}-e{epoch:06d}-{index:02d}.png"
                partial = path.with_name(path.name + ".partial")
                image.save(partial, format="PNG")
                partial.replace(path)
                self.on_event({"event": "sample", "epoch": epoch, "path": str(path), "prompt": prompt.prompt})
        finally:
            for module in self.trained.values():
                module.train()


def _bucket_info(data: TrainingSet) -> dict[str, Any]:
    counts = data.bucket_counts()
    buckets: dict[str, Any] = {}
    for i, bucket in enumerate(sorted(counts, key=lambda b: (b.width, b.height))):
        buckets[str(i)] = {"resolution": [bucket.width, bucket.height], "count": counts[bucket]}
    return {"buckets": buckets, "mean_img_ar_error": 0.0}

