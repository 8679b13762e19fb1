"""Training step rate of our Trainer against a bare peft loop on the same tiny model; peak memory.

    python bench/training.py [--base sd15|sdxl] [--resolution 64] [--batch 1] [--steps 60] [--repeats 2]

Both sides train the same LoRA (UNet + text encoders, the same peft targets, rank and optimizer) on
the tiny checkpoint loaded through the product loader, at the same batch size and resolution, from
cached latents. The bare loop is the minimum a step needs (noise, timesteps, text encoder, UNet, MSE,
backward, clip, AdamW); the Trainer adds buckets, captions, events and its bookkeeping. Reported:
steps/s of each (best of --repeats, after --warmup steps), their ratio (goal >= 0.9) and the peak RSS
of the process after the Trainer runs. Runs on CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tests.tiny.fixtures import tiny_files  # noqa: E402
from training.config import parse_config  # noqa: E402
from training.runfile import RunSpec  # noqa: E402
from training.trainer import Trainer  # noqa: E402

CAPTIONS = ["a red square", "a blue square", "a green square", "a yellow square"]
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 220, 40)]


def _dataset(root: Path, resolution: int, repeats: int) -> Path:
    folder = root / f"{repeats}_squares"
    folder.mkdir(parents=True)
    for i, (caption, colour) in enumerate(zip(CAPTIONS, COLOURS, strict=True)):
        Image.new("RGB", (resolution, resolution), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return root


def _config(args: argparse.Namespace) -> dict:
    return {"resolution": args.resolution, "min_bucket_reso": min(64, args.resolution),
            "max_bucket_reso": max(1024, args.resolution), "bucket_reso_steps": 16, "network_dim": args.dim,
            "network_alpha": args.dim, "unet_lr": 1e-3, "text_encoder_lr": 1e-4, "max_train_epochs": 1,
            "train_batch_size": args.batch, "save_every_n_epochs": 0, "seed": 1}


def trainer_rate(args: argparse.Namespace, files, tmp: Path) -> float:
    repeats = math.ceil((args.steps + args.warmup) * args.batch / len(CAPTIONS))
    dataset = _dataset(tmp / "dataset", args.resolution, repeats)
    run = RunSpec(base_model=files.checkpoint(args.base), base_type=args.base, train_data_dir=dataset,
                  output_dir=tmp / "out", state_dir=tmp / "state", skeleton_dirs=(files.skeleton_root,))
    config = parse_config(_config(args) | {"max_train_steps": args.steps + args.warmup}, base_type=args.base)
    stamps: list[float] = []
    Trainer(run, config, on_event=lambda e: stamps.append(time.perf_counter()) if e["event"] == "step" else None).run()
    return args.steps / (stamps[-1] - stamps[args.warmup - 1])


def bare_rate(args: argparse.Namespace, files) -> float:
    """The loop of diffusers' train_text_to_image_lora.py reduced to its tensors."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from pipelines.loader import load_checkpoint
    from training.export import text_encoder_lora_targets, unet_lora_targets

    pipe = load_checkpoint(files.checkpoint(args.base), skeleton_dirs=[files.skeleton_root])
    sdxl = args.base == "sdxl"
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
    for module in [pipe.unet, pipe.vae, *encoders]:
        module.requires_grad_(False)
    lora = {"r": args.dim, "lora_alpha": args.dim, "init_lora_weights": "gaussian"}
    pipe.unet.add_adapter(LoraConfig(**lora, target_modules=unet_lora_targets(args.base)))
    for encoder in encoders:
        encoder.add_adapter(LoraConfig(**lora, target_modules=text_encoder_lora_targets()))
    unet_params = [p for p in pipe.unet.parameters() if p.requires_grad]
    te_params = [p for e in encoders for p in e.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": unet_params, "lr": 1e-3}, {"params": te_params, "lr": 1e-4}])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    side = args.resolution // pipe.vae_scale_factor
    latents = torch.randn(len(CAPTIONS), 4, side, side)
    ids = [t(CAPTIONS, padding="max_length", max_length=t.model_max_length, truncation=True,
             return_tensors="pt").input_ids for t in tokenizers]
    time_ids = torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]] * args.batch,
                            dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)

    def step(i: int) -> None:
        pick = [(i * args.batch + j) % len(CAPTIONS) for j in range(args.batch)]
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        outs = [e(i_[pick], output_hidden_states=True) for e, i_ in zip(encoders, ids, strict=True)]
        if sdxl:
            hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
            added = {"text_embeds": outs[1].text_embeds, "time_ids": time_ids}
        else:
            hidden, added = outs[0].last_hidden_state, None
        pred = pipe.unet(noisy, t, hidden, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet_params + te_params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    for i in range(args.warmup):
        step(i)
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    return args.steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 avoids OpenMP spin-waits distorting ratios on a shared machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.disable(logging.INFO)
    files = tiny_files()
    files.checkpoint(args.base)
    ours, bare, peak_mib = [], [], 0.0
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            ours.append(trainer_rate(args, files, Path(tmp)))
        if repeat == 0:
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        bare.append(bare_rate(args, files))
    best_ours, best_bare = max(ours), max(bare)
    ratio = best_ours / best_bare
    print(f"LoRA training — tiny {args.base}, {args.resolution}x{args.resolution}, batch {args.batch}, rank {args.dim}, "
          f"UNet + text encoders, {args.steps} steps after {args.warmup} warm-up, {args.threads} thread(s), "
          f"best of {args.repeats}")
    print(f"{'loop':<28}{'steps/s':>10}")
    print(f"{'Trainer':<28}{best_ours:>10.2f}")
    print(f"{'bare peft loop':<28}{best_bare:>10.2f}")
    print(f"ratio Trainer / bare: {ratio:.3f} (goal >= 0.9 -> {'met' if ratio >= 0.9 else 'NOT met'})")
    print(f"peak RSS after the Trainer run: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
