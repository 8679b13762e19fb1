"""Model registry and imports (issue 4): registry, the one import path, server/URL/browser imports, tasks.

Importable without torch: pipelines (probe, conversion) are imported inside the functions that need
them, which run in import worker threads.
"""

from webapp.services.models.importer import ImportOutcome, ImportRequest, Inspection
from webapp.services.models.registry import ModelRegistry
from webapp.services.models.scan import ScanSummary

__all__ = ["ImportOutcome", "ImportRequest", "Inspection", "ModelRegistry", "ScanSummary"]
