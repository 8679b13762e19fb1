"""The inference engine: model files, loading, caching and generation.

Knows nothing of the web, the database or users. Importing the package is cheap (no torch); the
heavy modules import torch when they are imported themselves.
"""
