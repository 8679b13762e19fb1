"""The ``sagemaker`` backend on the local data plane: it creates its endpoint (moto), sees it InService, applies
autoscaling, runs real-time and async jobs through the router into our container, hands async jobs to a new
backend after a "restart" (adopt), notices an endpoint deleted behind its back, and tears everything down."""

from __future__ import annotations

import time
from typing import Any

import pytest

from deploy.backends.messages import Failed, Progress, Started, Succeeded
from deploy.backends.registry import BackendConfig, create_backend
from deploy.sagemaker.control import SageMakerControl
from tests.backends.events import Sink
from tests.container.worker import fake_spec
from tests.fixtures.moto_server import moto_client
from tests.fixtures.sagemaker_router import CONTAINER_URL_VARIABLE, ROLE_ARN

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/studio-worker:test"


def _wait(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _backend(plane: Any, name: str, *, endpoint_type: str, provision: bool = True, autoscale: bool = True,
             low: int = 0, high: int = 2, **options: Any):
    config = BackendConfig(
        name=name, kind="sagemaker", store=plane.store, provision=provision, min_instances=low, max_instances=high,
        autoscale=autoscale,
        options={"endpoint_type": endpoint_type, "image_uri": IMAGE, "role_arn": ROLE_ARN, "state_seconds": 0.05,
                 "poll_seconds": 0.05, "environment": {CONTAINER_URL_VARIABLE: plane.container.url}, **options})
    return create_backend(config)


@pytest.fixture
def control(sagemaker_data_plane):
    return SageMakerControl()


def test_realtime_endpoint_is_created_scaled_and_runs_a_job(sagemaker_data_plane, control):
    backend = _backend(sagemaker_data_plane, "sm-rt", endpoint_type="realtime", low=1, high=3)
    sink = Sink()
    backend.start(sink)
    try:
        _wait(lambda: backend.status() == ("InService", None))
        assert backend.free_slots() == 4 and backend.health() == (True, None)
        cloud = control.describe("sm-rt")
        assert cloud is not None and cloud.managed and cloud.endpoint_type == "realtime"
        scaling = moto_client("application-autoscaling", sagemaker_data_plane.moto)
        _wait(lambda: scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] != [])
        target = next(t for t in scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
                      if t["ResourceId"] == "endpoint/sm-rt/variant/AllTraffic")
        assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 3)  # real-time never scales to zero
        model = moto_client("sagemaker", sagemaker_data_plane.moto).describe_model(ModelName="sm-rt")
        assert model["PrimaryContainer"]["Environment"]["STUDIO_WORKER_STORE"] == \
            f"s3://{sagemaker_data_plane.bucket}/studio"

        backend.submit(fake_spec("rt-job", prompt="a real-time fox"))
        done = sink.wait_terminal("rt-job")
        assert isinstance(done, Succeeded) and done.image_keys == ("jobs/rt-job/0.png",)
        assert sagemaker_data_plane.store.stat("jobs/rt-job/0.png") is not None
        assert isinstance(sink.of(Started, "rt-job")[0], Started) and sink.of(Started, "rt-job")[0].handle is None

        backend.submit(fake_spec("rt-bad", prompt="please CRASH now"))
        failed = sink.wait_terminal("rt-bad")
        assert isinstance(failed, Failed) and failed.kind == "internal"
    finally:
        backend.stop()
        backend.teardown()
    assert control.describe("sm-rt") is None
    assert not [t for t in moto_client("application-autoscaling", sagemaker_data_plane.moto).describe_scalable_targets(
        ServiceNamespace="sagemaker")["ScalableTargets"] if t["ResourceId"].startswith("endpoint/sm-rt/")]


def test_async_jobs_report_progress_survive_a_restart_and_are_adopted(sagemaker_data_plane, control):
    backend = _backend(sagemaker_data_plane, "sm-async", endpoint_type="async")
    sink = Sink()
    backend.start(sink)
    try:
        _wait(lambda: backend.status() == ("InService", None))
        backend.submit(fake_spec("as-job", prompt="a slow harbour", steps=30))
        started = sink.of(Started, "as-job")[0]
        assert isinstance(started, Started) and started.handle["job_id"] == "as-job"  # before submit returned
        done = sink.wait_terminal("as-job")
        assert isinstance(done, Succeeded) and done.image_keys == ("jobs/as-job/0.png",)
        assert any(e.step > 0 for e in sink.of(Progress, "as-job"))

        # a "restart": the first backend stops while a job runs; a new one adopts it with the recorded handle
        backend.submit(fake_spec("as-long", prompt="a long harbour", steps=120))
        handle = sink.of(Started, "as-long")[0].handle
        backend.stop()
        assert not sink.of((Succeeded, Failed), "as-long")  # nothing reported
        second = _backend(sagemaker_data_plane, "sm-async", endpoint_type="async", provision=False)
        sink2 = Sink()
        second.start(sink2)
        try:
            assert second.adopt(fake_spec("as-long", prompt="a long harbour", steps=120), handle)
            again = sink2.wait_terminal("as-long", timeout=60)
            assert isinstance(again, Succeeded) and again.image_keys == ("jobs/as-long/0.png",)
        finally:
            second.stop()
    finally:
        backend.stop()
        backend.teardown()
    assert control.describe("sm-async") is None


def test_an_endpoint_deleted_behind_the_studios_back_is_failed_not_recreated(sagemaker_data_plane, control):
    backend = _backend(sagemaker_data_plane, "sm-gone", endpoint_type="async")
    backend.start(Sink())
    try:
        _wait(lambda: backend.status() == ("InService", None))
        moto_client("sagemaker", sagemaker_data_plane.moto).delete_endpoint(EndpointName="sm-gone")
        _wait(lambda: backend.status()[0] == "Failed")
        status, reason = backend.status()
        assert "no longer exists" in reason and backend.free_slots() == 0 and backend.health()[0] is False
    finally:
        backend.stop()
    restarted = _backend(sagemaker_data_plane, "sm-gone", endpoint_type="async", provision=False)
    restarted.start(Sink())
    try:
        _wait(lambda: restarted.status()[0] == "Failed")
        assert control.describe("sm-gone") is None  # a restart watches; it never creates
    finally:
        restarted.stop()
        restarted.teardown()  # what is left (config, model) goes quietly


def test_a_bad_plan_or_a_local_store_is_refused_naming_the_field(sagemaker_data_plane, tmp_path):
    from deploy.backends.options import OptionsError, parse_options
    from deploy.storage import open_store

    options = parse_options("sagemaker", {"image_uri": IMAGE, "role_arn": ROLE_ARN, "endpoint_type": "realtime"})
    with pytest.raises(OptionsError) as bad_min:
        options.check_deployment(name="rt", min_instances=0, max_instances=2, autoscale=True,
                                 store=sagemaker_data_plane.store)
    assert bad_min.value.field == "min_instances" and "zero" in str(bad_min.value)
    with pytest.raises(OptionsError) as local:
        options.check_deployment(name="rt", min_instances=1, max_instances=2, autoscale=True,
                                 store=open_store(tmp_path / "store"))
    assert local.value.field == "kind" and "S3" in str(local.value)
    no_role = parse_options("sagemaker", {"image_uri": IMAGE})
    with pytest.raises(OptionsError) as role:
        no_role.check_deployment(name="x", min_instances=0, max_instances=1, autoscale=False,
                                 store=sagemaker_data_plane.store)
    assert role.value.field == "options.role_arn"
    with pytest.raises(OptionsError) as env:
        parse_options("sagemaker", {"image_uri": IMAGE, "role_arn": ROLE_ARN,
                                    "environment": {"bad name": "x"}}).check_deployment(
            name="x", min_instances=0, max_instances=1, autoscale=False, store=sagemaker_data_plane.store)
    assert env.value.field == "options.environment"
