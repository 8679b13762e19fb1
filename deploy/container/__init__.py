"""The serving container: one worker process that runs jobs for a control plane over HTTP.

``python -m deploy.container serve`` starts it (the SageMaker entry is the same: ``docker run image serve``).
It wraps one backend (``LocalBackend`` on the machine's GPUs in production) in a ``WorkerHost`` and speaks
the worker protocol documented in ``deploy.container.server``. It imports pipelines/ and deploy/ only.
"""

from __future__ import annotations

from importlib import metadata


def _version() -> str:
    try:
        return metadata.version("studio")
    except metadata.PackageNotFoundError:
        return "0.0.0+source"


VERSION = _version()
