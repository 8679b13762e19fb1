"""Async invocations: input and answer in S3, progress from the container's progress object, a handle that
survives a restart, failures through the failure location."""

from __future__ import annotations

import json
import time

import pytest

from deploy.backends.messages import Event, Failed, Progress, Succeeded
from deploy.sagemaker.runtime import AsyncHandle, InvocationError, SageMakerRuntime, split_s3_uri
from deploy.storage import MemoryStore
from tests.container.worker import fake_spec
from tests.fixtures.moto_server import moto_client


@pytest.fixture(scope="module")
def plane(sagemaker_data_plane):
    sagemaker_data_plane.register("async-fake", asynchronous=True)
    return sagemaker_data_plane


@pytest.fixture(scope="module")
def runtime(plane):
    return SageMakerRuntime(store=plane.store)


def collect(runtime: SageMakerRuntime, handle: AsyncHandle, timeout: float = 30.0) -> tuple[list[Progress], Event]:
    """Poll (bounded) until the terminal event; the Progress events seen on the way."""
    seen: list[Progress] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = runtime.poll(handle)
        if isinstance(event, Progress):
            seen.append(event)
        elif event is not None:
            return seen, event
        time.sleep(0.05)
    raise AssertionError(f"no answer for {handle.inference_id} within {timeout}s")


def _exists(s3, location: str) -> bool:
    bucket, key = split_s3_uri(location)
    return s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) > 0


def test_submit_returns_a_handle_then_polls_give_progress_and_the_images(plane, runtime):
    handle = runtime.submit_async("async-fake", fake_spec("as-1", prompt="a slow harbour", steps=40))
    assert handle.job_id == "as-1" and handle.inference_id.startswith("as-1-1-")
    assert handle.output_location == f"{plane.output_path}/{handle.inference_id}.out"
    assert handle.failure_location == f"{plane.failure_path}/{handle.inference_id}-error.out"
    assert handle.input_key == f"sagemaker/inputs/{handle.inference_id}.json"
    assert json.loads(plane.store.open(handle.input_key).read())["job_id"] == "as-1", "the spec went to S3"

    progress, event = collect(runtime, handle)
    running = [p for p in progress if p.step > 0]
    assert running, "steps were visible before the end"
    assert all(p.job_id == "as-1" and p.total == 40 for p in running)
    assert [p.step for p in running] == sorted(p.step for p in running)
    assert any(p.preview_png for p in running), "previews travel in the progress object"
    assert isinstance(event, Succeeded) and event.image_keys == ("jobs/as-1/0.png",)
    assert plane.store.exists("jobs/as-1/0.png") and "a slow harbour" in event.infotexts[0]
    assert not _exists(plane.s3, handle.failure_location)


def test_a_failing_job_lands_in_the_failure_location_and_notifies_the_error_topic(plane, runtime):
    sns, sqs = moto_client("sns", plane.moto), moto_client("sqs", plane.moto)
    success = sns.create_topic(Name="studio-async-ok")["TopicArn"]
    failure = sns.create_topic(Name="studio-async-failed")["TopicArn"]
    queue = sqs.create_queue(QueueName="studio-async-events")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    for topic in (success, failure):
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn, Attributes={"RawMessageDelivery": "true"})
    plane.register("async-notify", asynchronous=True, topics=(success, failure))

    handle = runtime.submit_async("async-notify", fake_spec("as-fail", prompt="CRASH the harbour"))
    _, event = collect(runtime, handle)
    assert event == Failed(job_id="as-fail", message="internal error: the fake backend was told to crash",
                           kind="internal")
    assert _exists(plane.s3, handle.failure_location) and not _exists(plane.s3, handle.output_location)
    messages = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=5).get("Messages", [])
    notice = json.loads(messages[0]["Body"])
    assert notice["invocationStatus"] == "Failed" and notice["inferenceId"] == handle.inference_id
    assert notice["responseParameters"]["failureLocation"] == handle.failure_location


def test_a_new_runtime_collects_with_the_stored_handle_and_cleanup_removes_the_objects(plane, runtime):
    handle = runtime.submit_async("async-fake", fake_spec("as-restart", steps=20))
    stored = json.dumps(handle.to_dict())  # what the job row keeps

    restarted = SageMakerRuntime(store=plane.store)
    again = AsyncHandle.from_dict(json.loads(stored))
    assert again == handle
    _, event = collect(restarted, again)
    assert isinstance(event, Succeeded) and event.image_keys == ("jobs/as-restart/0.png",)
    assert plane.store.exists(handle.progress_key) and _exists(plane.s3, handle.output_location)

    restarted.cleanup(again)
    assert not plane.store.exists(handle.input_key) and not plane.store.exists(handle.progress_key)
    assert not _exists(plane.s3, handle.output_location)
    assert plane.store.exists("jobs/as-restart/0.png"), "the images are the result: they stay"
    assert restarted.poll(again) is None, "after cleanup nothing is there (and nothing raises)"
    restarted.cleanup(again)  # twice is fine


def test_async_errors_before_the_job_runs(plane, runtime):
    with pytest.raises(InvocationError, match="not found") as caught:
        runtime.submit_async("no-such-endpoint", fake_spec("as-x"))
    assert caught.value.kind == "validation"
    left = [blob.key for blob in plane.store.list("sagemaker/inputs/") if "as-x" in blob.key]
    assert left == [], "a refused submit leaves no input behind"
    with pytest.raises(ValueError, match="need an S3 asset store"):
        SageMakerRuntime(store=MemoryStore()).submit_async("async-fake", fake_spec("as-y"))
    with pytest.raises(ValueError, match="not an async invocation handle"):
        AsyncHandle.from_dict({"inference_id": "x"})


def test_an_unreadable_bucket_is_unavailable_not_silence(plane, runtime):
    handle = AsyncHandle(inference_id="gone", input_key="sagemaker/inputs/gone.json",
                         output_location="s3://no-such-bucket-for-studio/out/gone.out", failure_location="",
                         progress_key="sagemaker/progress/gone.json", submitted_at=time.time(), job_id="gone")
    with pytest.raises(InvocationError) as caught:
        runtime.poll(handle)
    assert caught.value.kind == "unavailable" and "NoSuchBucket" in caught.value.message
