"""LoRA training: a typed config with kohya's key names, a kohya-layout dataset reader, one readable
training loop on peft adapters, kohya-format export, and a CLI (`python -m training`) that the
training runner starts out of process and reads as JSON lines.

This package knows nothing of the web, the database or users: it reads a run file, a dataset folder
and a base checkpoint from disk, and writes LoRA files, sample images and resumable state to disk.
"""
