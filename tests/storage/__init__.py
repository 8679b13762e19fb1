"""Tests of the asset store (deploy/storage): one contract, local, memory and S3-on-moto."""
