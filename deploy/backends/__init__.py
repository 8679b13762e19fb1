"""Backends: where jobs run (local devices now; HTTP workers and SageMaker endpoints next).

``base.Backend`` is the one contract, ``messages`` what travels to and from a backend (JSON-safe),
``registry`` builds a backend by kind from configuration. Nothing here imports webapp.

How a job flows::

    JobService.submit  -> job row (queued)                      webapp/services/jobs/service.py
    Dispatcher (per endpoint) -> JobQueue.claim -> JobSpec      webapp/services/jobs/dispatcher.py
    Backend.submit(spec) ... events via the sink:              deploy/backends/<kind>.py
        Started, Progress*, then Succeeded | Failed | Cancelled
    Dispatcher records them: board (live), row, images under jobs/<job_id>/<n>.png

Add a backend (e.g. a self-hosted HTTP worker):

1. ``deploy/backends/<kind>.py``: a ``Backend`` subclass with ``kind``, ``is_configured``, ``capabilities``
   (``remote=True`` turns the UI button into "Generate on Cloud"), ``start(sink)``, ``free_slots``,
   ``submit(spec)``, ``cancel(job_id)``, ``stop`` (``claimable_kinds`` where free room depends on the job's
   kind; and, where it can, ``skip(job_id)`` for A1111's skip
   and ``release_memory()`` for unload-checkpoint; ``health()`` where it can become unreachable: polled every
   few seconds, an unhealthy answer shows the endpoint ``Degraded`` and holds its queue). Send
   ``spec.to_json()`` over the wire; decode the worker's answers with ``messages.event_from_json`` and hand them to the sink. Results may come back
   as PNG bytes or as asset-store keys the worker wrote (``Succeeded.image_keys``). A worker that dies
   mid-job reports ``Failed(kind="interrupted")``: the queue runs the job again (bounded attempts).
2. ``create(config: BackendConfig) -> Backend`` in that module and one line in ``registry._FACTORIES``
   (or ``register_backend(kind, factory)``); a pydantic options model in ``options.py`` (or
   ``register_options(kind, model)``), ``SecretStr`` for secrets — the Endpoints tab renders its fields and
   ``POST /api/v1/endpoints`` validates with it.
3. Administrators deploy it from the Endpoints tab or the API: the ``Fleet`` (webapp) builds the backend
   through the registry and gives it a ``Dispatcher`` at once, and again from the stored row at every start
   (a kind that cannot be built leaves the endpoint ``Failed`` with the reason). Services and UI need no
   change. Test it like the fake (tests/jobs/test_backends.py, tests/jobs/test_endpoints.py).
"""
