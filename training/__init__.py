"""LoRA training: config, dataset, trainer, export."""
