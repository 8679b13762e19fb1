"""LoRA trainings (issue 13): `TrainingService` submits and follows ``train_lora`` jobs, `TrainingRegistrar`
registers a succeeded training's LoRAs as the owner's models."""

from webapp.services.trainings.registration import TrainingRegistrar
from webapp.services.trainings.service import BASE_OF_TYPE, TrainingService, lora_keys, sample_keys

__all__ = ["BASE_OF_TYPE", "TrainingRegistrar", "TrainingService", "lora_keys", "sample_keys"]
