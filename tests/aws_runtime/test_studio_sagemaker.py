"""The studio with a SageMaker endpoint, for real on the local data plane: an administrator deploys it (moto), it is
InService with autoscaling, a txt2img job runs on it asynchronously, and a studio restart in the middle of an async
job loses nothing and runs nothing twice. Deleting it removes the cloud resources; a running job blocks the delete
unless forced; endpoints created outside the studio are listed as unmanaged."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures.moto_server import moto_client
from tests.fixtures.sagemaker_router import CONTAINER_URL_VARIABLE, ROLE_ARN
from tests.fixtures.studio_models import register_tiny_models
from webapp.records import EndpointStatus, JobStatus
from webapp.services.errors import Conflict, InvalidInput
from webapp.services.jobs import Deployment

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/studio-worker:test"
ADMIN_PASSWORD = "admin-password-123"


def _build(plane: Any, data_dir: Any, files: Any) -> Any:
    import app
    from webapp.settings import Settings

    settings = Settings(data_dir=data_dir, admin_password=ADMIN_PASSWORD, backend="fake",
                        store=f"s3://{plane.bucket}/studio", sagemaker_image_uri=IMAGE, sagemaker_role_arn=ROLE_ARN,
                        endpoint_health_seconds=0.1, skeleton_dirs=[files.skeleton_root])
    return app.build(settings)


@pytest.fixture
def studio_factory(sagemaker_data_plane, tmp_path, tiny_model_files) -> Iterator[Any]:
    built: list[Any] = []

    def make() -> Any:
        studio = _build(sagemaker_data_plane, tmp_path / "data", tiny_model_files)
        built.append(studio)
        return studio

    yield make
    for studio in built:
        studio.close()


def _wait(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _deploy(studio: Any, plane: Any, name: str, **options: Any) -> Any:
    admin = studio.users.get_by_name("admin")
    request = Deployment(kind="sagemaker", name=name, min_instances=0, max_instances=2, autoscale=True,
                         options={"endpoint_type": "Async", "state_seconds": 0.1, "poll_seconds": 0.1,
                                  "environment": {CONTAINER_URL_VARIABLE: plane.container.url}, **options})
    return studio.endpoint_admin.deploy(actor=admin, request=request)


def _txt2img(checkpoint: str, **overrides: Any) -> dict[str, Any]:
    return {"prompt": "a harbour at dusk", "steps": 8, "width": 64, "height": 64, "seed": 3,
            "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": checkpoint}, **overrides}


def test_deploy_generate_restart_mid_job_and_delete(sagemaker_data_plane, studio_factory, tiny_model_files):
    plane = sagemaker_data_plane
    studio = studio_factory()
    admin = studio.users.get_by_name("admin")
    models = register_tiny_models(studio, tiny_model_files)
    checkpoint = models.checkpoint.name

    endpoint = _deploy(studio, plane, "studio-async-test")
    assert endpoint.remote and endpoint.kind == "sagemaker"
    _wait(lambda: studio.jobs.endpoints.find("studio-async-test").status == EndpointStatus.IN_SERVICE)
    scaling = moto_client("application-autoscaling", plane.moto)
    _wait(lambda: scaling.describe_scalable_targets(
        ServiceNamespace="sagemaker", ResourceIds=["endpoint/studio-async-test/variant/AllTraffic"])
        ["ScalableTargets"])
    targets = scaling.describe_scalable_targets(ServiceNamespace="sagemaker",
                                                ResourceIds=["endpoint/studio-async-test/variant/AllTraffic"])
    assert (targets["ScalableTargets"][0]["MinCapacity"], targets["ScalableTargets"][0]["MaxCapacity"]) == (0, 2)

    job = studio.jobs.submit(actor=admin, mode="txt2img", request=_txt2img(checkpoint), endpoint="studio-async-test")
    done = studio.jobs.wait(actor=admin, job_id=job.id, timeout=60)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert len(done.image_keys) == 1 and studio.store.stat(done.image_keys[0]) is not None
    assert done.remote_handle is not None and done.worker == "studio-async-test"

    # a restart in the middle of an async job: the job goes on in the cloud and is collected by the next studio
    slow = studio.jobs.submit(actor=admin, mode="txt2img", request=_txt2img(checkpoint, steps=150, seed=4),
                              endpoint="studio-async-test")
    _wait(lambda: studio.jobs.get(actor=admin, job_id=slow.id).remote_handle is not None)
    handle = studio.jobs.get(actor=admin, job_id=slow.id).remote_handle
    studio.close()
    studio = studio_factory()
    admin = studio.users.get_by_name("admin")
    again = studio.jobs.wait(actor=admin, job_id=slow.id, timeout=90)
    assert again.status == JobStatus.SUCCEEDED, again.error
    assert again.attempts == 1 and again.remote_handle == handle  # collected, not run a second time
    assert studio.store.stat(again.image_keys[0]) is not None

    # delete: refused while a job runs unless forced; then everything goes on SageMaker too
    running = studio.jobs.submit(actor=admin, mode="txt2img", request=_txt2img(checkpoint, steps=150, seed=5),
                                 endpoint="studio-async-test")
    _wait(lambda: studio.jobs.get(actor=admin, job_id=running.id).status == JobStatus.RUNNING)
    with pytest.raises(Conflict) as refused:
        studio.endpoint_admin.delete(actor=admin, name="studio-async-test")
    assert refused.value.field == "force"
    studio.endpoint_admin.delete(actor=admin, name="studio-async-test", force=True)
    sagemaker = moto_client("sagemaker", plane.moto)
    assert not [e for e in sagemaker.list_endpoints()["Endpoints"] if e["EndpointName"] == "studio-async-test"]
    assert not [m for m in sagemaker.list_models()["Models"] if m["ModelName"] == "studio-async-test"]
    assert not scaling.describe_scalable_targets(
        ServiceNamespace="sagemaker", ResourceIds=["endpoint/studio-async-test/variant/AllTraffic"])["ScalableTargets"]
    moved = studio.jobs.get(actor=admin, job_id=running.id)
    assert moved.endpoint == "local" and moved.remote_handle is None  # runs again on the default endpoint
    plane.wait_async_idle()


def test_bad_deployments_name_the_field_and_store_nothing(sagemaker_data_plane, studio_factory):
    studio = studio_factory()
    admin = studio.users.get_by_name("admin")
    before = [e.name for e in studio.jobs.endpoints.stored()]
    cases = [({"endpoint_type": "realtime"}, 0, "min_instances"),
             ({"instance_type": "g5.big"}, 1, "options.instance_type"),
             ({"endpoint_type": "sometimes"}, 1, "options.endpoint_type"),
             ({"environment": {"A B": "x"}}, 1, "options.environment")]
    for options, low, field in cases:
        with pytest.raises(InvalidInput) as bad:
            studio.endpoint_admin.deploy(actor=admin, request=Deployment(
                kind="sagemaker", name="bad-one", options=options, min_instances=low, max_instances=2, autoscale=True))
        assert bad.value.field == field, (options, bad.value)
    assert [e.name for e in studio.jobs.endpoints.stored()] == before
    assert not [e for e in moto_client("sagemaker", sagemaker_data_plane.moto).list_endpoints()["Endpoints"]
                if e["EndpointName"] == "bad-one"]


def test_endpoints_created_outside_the_studio_are_listed_as_unmanaged(sagemaker_data_plane, studio_factory):
    plane = sagemaker_data_plane
    plane.register("made-in-the-console", asynchronous=True)
    studio = studio_factory()
    admin = studio.users.get_by_name("admin")
    unmanaged = {c.name: c for c in studio.inventory.unmanaged(actor=admin, fresh=True)}
    assert "made-in-the-console" in unmanaged and not unmanaged["made-in-the-console"].managed
    _deploy(studio, plane, "studio-uses-it", existing=True, sagemaker_name="made-in-the-console")
    _wait(lambda: studio.jobs.endpoints.find("studio-uses-it").status == EndpointStatus.IN_SERVICE)
    assert "made-in-the-console" not in {c.name for c in studio.inventory.unmanaged(actor=admin, fresh=True)}
    studio.endpoint_admin.delete(actor=admin, name="studio-uses-it")
    # an endpoint the studio did not create is never deleted by it
    assert moto_client("sagemaker", plane.moto).describe_endpoint(EndpointName="made-in-the-console")


def test_defaults_as_the_seeds_name_them(sagemaker_data_plane, studio_factory):
    """No name and no autoscale given: studio-async-<id> / studio-rt-<id>, ml.g5.2xlarge, one instance, autoscaling on."""
    plane = sagemaker_data_plane
    studio = studio_factory()
    admin = studio.users.get_by_name("admin")
    made = []
    try:
        for endpoint_type, prefix in (("async", "studio-async-"), ("Real-time", "studio-rt-")):
            endpoint = studio.endpoint_admin.deploy(actor=admin, request=Deployment(
                kind="sagemaker", options={"endpoint_type": endpoint_type, "state_seconds": 0.1,
                                           "environment": {CONTAINER_URL_VARIABLE: plane.container.url}}))
            made.append(endpoint.name)
            assert endpoint.name.startswith(prefix) and endpoint.autoscale is True
            assert (endpoint.min_instances, endpoint.max_instances) == (1, 1)
            config = moto_client("sagemaker", plane.moto).describe_endpoint_config(EndpointConfigName=endpoint.name)
            variant = config["ProductionVariants"][0]
            assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.g5.2xlarge", 1)
    finally:
        for name in made:
            studio.endpoint_admin.delete(actor=admin, name=name, force=True)
