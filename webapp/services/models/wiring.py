"""Build the model services once (called from app.py, the composition root) and tear them down."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from deploy.storage import BlobStore
from webapp.db import Database
from webapp.services.models.importer import Importer
from webapp.services.models.registry import ModelRegistry
from webapp.services.models.scan import ModelsDirScanner
from webapp.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ModelServices:
    registry: ModelRegistry

    def close(self) -> None:
        return None


def build_model_services(settings: Settings, db: Database, store: BlobStore) -> ModelServices:
    staging = settings.data_dir / "tmp" / "imports"
    staging.mkdir(parents=True, exist_ok=True)
    importer = Importer(db, store, staging)
    scanner = ModelsDirScanner(db, importer, settings.models_dir, settings.import_roots)
    registry = ModelRegistry(db, store, importer, scanner)
    return ModelServices(registry=registry)
