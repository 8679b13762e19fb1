"""Deployment side: asset storage, compute backends, serving and training containers."""
