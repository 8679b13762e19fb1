"""SageMaker training: the container's ``train`` command on a temp /opt/ml, and the control-plane client on moto."""

from __future__ import annotations

from tests.fixtures.moto_server import moto_server, s3_bucket, s3_client  # noqa: F401
