"""Real-time invocations: through boto3, the local runtime router and the container process, end to end."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from deploy.backends.messages import Failed, Succeeded
from deploy.sagemaker.runtime import INLINE_SPEC_BYTES, InvocationError, SageMakerRuntime
from tests.container.worker import fake_spec
from tests.fixtures.moto_server import moto_client
from tests.live import free_port


@pytest.fixture(scope="module")
def plane(sagemaker_data_plane):
    sagemaker_data_plane.register("rt-fake")
    return sagemaker_data_plane


@pytest.fixture(scope="module")
def runtime(plane):
    return SageMakerRuntime(store=plane.store)


def _read(store, key: str) -> bytes:
    with store.open(key) as stream:
        return stream.read()


def test_txt2img_runs_in_the_container_and_the_images_come_back_as_store_keys(plane, runtime):
    event = runtime.invoke("rt-fake", fake_spec("rt-1", prompt="a lighthouse at dusk", batch_size=2))
    assert isinstance(event, Succeeded) and event.job_id == "rt-1"
    assert event.images == () and event.image_keys == ("jobs/rt-1/0.png", "jobs/rt-1/1.png")
    assert event.seeds == (7, 8) and "a lighthouse at dusk" in event.infotexts[0]
    pngs = [_read(plane.store, key) for key in event.image_keys]
    assert [Image.open(io.BytesIO(png)).size for png in pngs] == [(64, 64), (64, 64)]
    assert pngs[0] != pngs[1], "one image per seed"

    again = runtime.invoke("rt-fake", fake_spec("rt-2", prompt="a lighthouse at dusk", batch_size=2),
                           results_prefix="elsewhere/rt-2")
    assert again.image_keys == ("elsewhere/rt-2/0.png", "elsewhere/rt-2/1.png")
    assert [_read(plane.store, key) for key in again.image_keys] == pngs, "deterministic: same request, same bytes"


def test_a_spec_over_the_inline_limit_travels_by_store_reference(plane, runtime):
    noise = Image.frombytes("RGB", (1400, 1400), os.urandom(1400 * 1400 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG", compress_level=0)
    spec = fake_spec("rt-big", mode="img2img", init_images=(buffer.getvalue(),), prompt="a big one")
    spec = type(spec)(job_id=spec.job_id, mode="img2img", request=spec.request, models=spec.models)
    body = spec.to_json().encode()
    assert len(body) > 6_291_456 > INLINE_SPEC_BYTES, "over SageMaker's real-time limit"

    raw = moto_client("sagemaker-runtime", plane.router_url)
    with pytest.raises(raw.exceptions.ClientError, match="ValidationError"):
        raw.invoke_endpoint(EndpointName="rt-fake", Body=body, ContentType="application/json")

    event = runtime.invoke("rt-fake", spec)
    assert isinstance(event, Succeeded) and event.job_id == "rt-big" and event.image_keys == ("jobs/rt-big/0.png",)
    assert "a big one" in event.infotexts[0]
    assert list(plane.store.list("sagemaker/inputs/")) == [], "the stored spec is removed after the call"


@pytest.mark.parametrize(("prompt", "kind", "message"), [
    ("CRASH now", "internal", "internal error: the fake backend was told to crash"),
    ("REJECT me", "bad_request", "the fake backend was told to reject this request"),
])
def test_a_failed_job_is_a_model_error_that_becomes_failed_with_the_containers_message(runtime, prompt, kind,
                                                                                       message):
    event = runtime.invoke("rt-fake", fake_spec("rt-fail", prompt=prompt))
    assert event == Failed(job_id="rt-fail", message=message, kind=kind)


def test_the_model_error_itself_carries_the_container_answer(plane):
    raw = moto_client("sagemaker-runtime", plane.router_url)
    with pytest.raises(raw.exceptions.ModelError) as caught:
        raw.invoke_endpoint(EndpointName="rt-fake", Body=b"not a spec", ContentType="application/json")
    assert caught.value.response["OriginalStatusCode"] == 400
    assert '"bad_spec"' in caught.value.response["OriginalMessage"]


def test_unknown_and_wrong_kind_endpoints_are_validation_errors(plane, runtime):
    with pytest.raises(InvocationError, match="Endpoint nowhere of account 123456789012 not found") as caught:
        runtime.invoke("nowhere", fake_spec("rt-x"))
    assert caught.value.kind == "validation"
    plane.register("rt-async-only", asynchronous=True)
    with pytest.raises(InvocationError, match="asynchronous") as caught:
        runtime.invoke("rt-async-only", fake_spec("rt-y"))
    assert caught.value.kind == "validation"


def test_the_route_comes_from_the_model_so_a_dead_container_is_unavailable(plane, runtime):
    plane.register("rt-dead", url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(InvocationError) as caught:
        runtime.invoke("rt-dead", fake_spec("rt-z"))
    assert caught.value.kind == "unavailable" and "did not answer" in caught.value.message
