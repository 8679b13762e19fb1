"""Tests of the SageMaker layer (deploy/sagemaker) against the in-process moto server."""
