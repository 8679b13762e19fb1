"""Backends: where jobs run (local devices now; HTTP workers and SageMaker endpoints next).

``base.Backend`` is the one contract, ``messages`` what travels to and from a backend (JSON-safe),
``registry`` builds a backend by kind from configuration. Nothing here imports webapp.
"""
