"""Store references for SageMaker invocations: a job spec read from the asset store, results written to it.

A real-time SageMaker invocation carries at most 6 MB each way (base64 adds a third), so a job with a large
init image cannot travel inline and two SDXL PNGs already fill an answer. The caller therefore names store keys
in ``X-Amzn-SageMaker-Custom-Attributes`` (which SageMaker forwards verbatim) and the worker, which shares the
caller's asset store, reads and writes the bytes there:

* ``spec=<key>``: the job spec is the JSON object at ``<key>``; the request body is ignored.
* ``results=<prefix>``: images go to ``<prefix>/<n>.png`` and the answer's event lists them in ``image_keys``
  (no base64 in the answer); the prefix the control plane keeps images under (``jobs/<job_id>``) makes them
  its own at once.

A terminal event is answered with the status SageMaker acts on: 200 for an outcome (succeeded, cancelled), an
error status for ``failed`` (so async invocations land in the failure location and error topic, and the
endpoint's error metrics count them); the body is the event's JSON either way.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping

from deploy.backends.messages import Cancelled, Event, Failed, Succeeded
from deploy.storage import BlobStore, StorageError, validate_key

SPEC_ATTRIBUTE = "spec"
RESULTS_ATTRIBUTE = "results"
FAILURE_STATUS = {"bad_request": 400, "oom": 500, "internal": 500, "interrupted": 503}
"""A failed job's HTTP status by failure kind: the input's fault, the machine's, or the worker stopping."""


def reference(attributes: Mapping[str, str], name: str) -> str | None:
    """The store key (or prefix: a trailing ``/`` is dropped) named by the attribute ``name``, validated
    (``InvalidKey``); None when absent."""
    value = attributes.get(name, "")
    value = value[:-1] if value.endswith("/") and len(value) > 1 else value
    if not value:
        return None
    validate_key(value)
    return value


def read_spec_bytes(store: BlobStore, key: str, limit: int) -> bytes:
    """The spec's bytes at ``key``, at most ``limit`` (``ValueError`` past it; ``BlobNotFound`` if absent)."""
    with store.open(key) as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"the job spec at {key!r} is larger than this worker's limit of {limit} bytes")
    return data


def store_results(event: Event, store: BlobStore, prefix: str) -> Event:
    """``event`` with its images moved to ``<prefix>/<n>.png`` in ``store`` (``image_keys``), else unchanged.

    A store failure ends the job ``Failed(internal)`` naming the key: the caller asked for keys and would
    otherwise get neither images nor keys."""
    if not isinstance(event, Succeeded | Cancelled) or not event.images:
        return event
    keys: list[str] = []
    for index, png in enumerate(event.images):
        key = f"{prefix}/{index}.png"
        try:
            store.put(key, io.BytesIO(png), content_type="image/png")
        except (StorageError, OSError) as exc:
            return Failed(job_id=event.job_id, message=f"storing result image {key!r} failed: {exc}",
                          kind="internal")
        keys.append(key)
    return dataclasses.replace(event, images=(), image_keys=tuple(keys))


def answer_status(event: Event) -> int:
    """The HTTP status the terminal ``event`` is answered with."""
    return FAILURE_STATUS.get(event.kind, 500) if isinstance(event, Failed) else 200
