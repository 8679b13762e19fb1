"""SageMaker endpoints in the account that no studio endpoint manages, for administrators.

ESD's endpoint list drifted from the cloud (deleted endpoints shown InService, others missing). Each studio
endpoint's backend keeps its own row in step (``deploy/backends/sagemaker.py``); this lists the rest: endpoints
created outside the studio, or left by a studio whose database was lost (tagged ``studio:managed`` but with no
row here). An administrator can then deploy a studio endpoint with ``existing: true`` to use one, or delete it in
the AWS console. Answers are cached for ``ttl_seconds`` so a refreshing tab does not call AWS each time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from webapp.records import User
from webapp.services.access import authorize
from webapp.services.errors import Unavailable
from webapp.services.jobs.endpoints import EndpointService

log = logging.getLogger(__name__)


class SageMakerInventory:
    def __init__(self, *, endpoints: EndpointService, configured: bool, region: str | None = None,
                 ttl_seconds: float = 30.0, control_factory: Callable[[], Any] | None = None) -> None:
        """``configured``: the server has SageMaker settings (else only stored sagemaker endpoints make it look)."""
        self._endpoints = endpoints
        self._configured = configured
        self._region = region
        self._ttl = ttl_seconds
        self._control_factory = control_factory
        self._control: Any = None
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Any]] | None = None

    def enabled(self) -> bool:
        return self._configured or any(e.kind == "sagemaker" for e in self._endpoints.stored())

    def unmanaged(self, *, actor: User, fresh: bool = False) -> list[Any]:
        """``CloudEndpoint``s no studio endpoint here stands for (sorted by name); [] when SageMaker is not used."""
        authorize(actor, "endpoint:create")
        if not self.enabled():
            return []
        with self._lock:
            if not fresh and self._cached is not None and time.monotonic() - self._cached[0] < self._ttl:
                listed = self._cached[1]
            else:
                listed = self._list()
                self._cached = (time.monotonic(), listed)
        ours = set()
        for row in self._endpoints.stored():
            if row.kind == "sagemaker":
                try:
                    config = json.loads(row.config_json or "{}")
                except ValueError:
                    config = {}
                ours.add(config.get("sagemaker_name") or row.name)
        return [cloud for cloud in listed if cloud.name not in ours]

    def _list(self) -> list[Any]:
        from deploy.sagemaker.control import CloudError, SageMakerControl

        try:
            if self._control is None:
                self._control = (self._control_factory or (lambda: SageMakerControl(region=self._region)))()
            return self._control.list_endpoints()
        except CloudError as exc:
            log.warning("listing SageMaker endpoints failed: %s", exc)
            raise Unavailable(f"SageMaker could not be asked for its endpoints: {exc}") from exc
