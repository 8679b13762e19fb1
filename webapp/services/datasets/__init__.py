"""Training datasets (kohya layout) in the asset store: `DatasetService`, its layout rules and views."""

from webapp.services.datasets.layout import Limits
from webapp.services.datasets.service import RESIZE_MODES, Created, DatasetService

__all__ = ["RESIZE_MODES", "Created", "DatasetService", "Limits"]
