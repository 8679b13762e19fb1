"""Tests for the training package (config, dataset, trainer, CLI)."""
