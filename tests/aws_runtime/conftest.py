"""The SageMaker runtime against a real local data plane: moto, the container process and the runtime router."""

from tests.fixtures.moto_server import moto_server  # noqa: F401
from tests.fixtures.sagemaker_router import sagemaker_data_plane  # noqa: F401
from tests.fixtures.studio_models import tiny_model_files  # noqa: F401
