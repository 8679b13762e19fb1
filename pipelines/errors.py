"""Error types of the inference engine.

Every failure the engine reports about a model file or a request is a `PipelineError`, which is a
`ValueError`: the caller gave us something we cannot use. The service layer translates these to a
4xx answer or a `gr.Error`; anything else escaping the engine is a bug or an environment problem.
Messages name the file and the offending value, because users act on them.
"""

from __future__ import annotations


class PipelineError(ValueError):
    """Base of all engine errors about inputs (files, requests)."""


class ModelFormatError(PipelineError):
    """The file is not a readable model file: truncated, corrupt header, wrong container."""


class UnsafeModelError(PipelineError):
    """The file would run code when loaded (a pickle with a callable payload); it was not executed."""


class UnknownModelTypeError(PipelineError):
    """The tensors do not look like any model type or architecture we know."""


class IncompatibleModelError(PipelineError):
    """The model is valid but cannot be used here (wrong base for this pipeline, unsupported variant)."""


class SkeletonNotFoundError(UnknownModelTypeError):
    """No config skeleton on the search path matches the checkpoint's tensors."""
