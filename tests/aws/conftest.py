"""Fixtures for the SageMaker suite: the shared moto server, inspection clients and a `SageMakerControl`
built the way production builds it (from the environment the moto fixture set).

moto validates endpoint-config instance types against an old list without ml.g5; the `control` fixture
lifts that check for the test only (product code never knows), while `strict_control` keeps it so a
test can make ``create_endpoint_config`` fail for real.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.session
import pytest

from deploy.sagemaker.control import SageMakerControl
from tests.fixtures.moto_server import moto_client, moto_server  # noqa: F401

ROLE_ARN = "arn:aws:iam::123456789012:role/studio-sagemaker"
IMAGE_URI = "123456789012.dkr.ecr.us-east-1.amazonaws.com/studio-serve:1.0"


@pytest.fixture(scope="session")
def aws_clients(moto_server: str) -> Iterator[dict[str, Any]]:  # noqa: F811
    """Clients to arrange and inspect moto's state around the code under test."""
    clients = {name: moto_client(name, moto_server) for name in ("sagemaker", "application-autoscaling", "cloudwatch")}
    yield clients
    for client in clients.values():
        client.close()


@pytest.fixture
def sm(aws_clients: dict[str, Any]) -> Any:
    return aws_clients["sagemaker"]


@pytest.fixture
def aas(aws_clients: dict[str, Any]) -> Any:
    return aws_clients["application-autoscaling"]


@pytest.fixture
def cw(aws_clients: dict[str, Any]) -> Any:
    return aws_clients["cloudwatch"]


@pytest.fixture
def allow_g5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let moto accept ml.g5 (and any other) instance types for this test."""
    from moto.sagemaker.models import FakeEndpointConfig

    monkeypatch.setattr(FakeEndpointConfig, "validate_instance_type", lambda self, instance_type: None)


@pytest.fixture
def strict_control(moto_server: str) -> Iterator[SageMakerControl]:  # noqa: F811
    """A control on moto with moto's instance-type check in force; one attempt per call (moto's
    'not implemented' 500s would otherwise be retried), set through the session as an operator would."""
    core = botocore.session.get_session()
    core.set_config_variable("max_attempts", 1)
    with SageMakerControl(session=boto3.session.Session(botocore_session=core)) as control:
        yield control


@pytest.fixture
def control(strict_control: SageMakerControl, allow_g5: None) -> SageMakerControl:
    return strict_control


@pytest.fixture
def endpoint_name() -> str:
    """A fresh name per test: the moto server is shared with other suites, so no test resets it."""
    return f"t-{uuid.uuid4().hex[:16]}"
