"""Extra networks applied per job on top of a checkpoint: LoRA/LoCon, textual inversion, hypernetworks, VAE.

Each module keeps its own cache and restores the pipeline after the job; the engine decides which
networks a prompt references (``pipelines.prompts``) and reports the ones it cannot use as warnings.
"""
