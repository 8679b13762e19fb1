"""How the runtime names what went wrong, without a data plane: error mapping, ids, attributes."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from deploy.backends.messages import Failed, Succeeded
from deploy.sagemaker.runtime import (
    AsyncHandle,
    InvocationError,
    SageMakerRuntime,
    _invocation_error,
    container_answer,
    custom_attributes,
    inference_id_for,
    progress_from_document,
)
from deploy.storage import MemoryStore
from tests.container.worker import fake_spec


def _client_error(code: str, status: int, **extra) -> ClientError:
    response = {"Error": {"Code": code, "Message": f"{code} happened"}, "ResponseMetadata": {"HTTPStatusCode": status},
                **extra}
    return ClientError(response, "InvokeEndpoint")


@pytest.mark.parametrize(("error", "kind"), [
    (_client_error("ValidationError", 400), "validation"),
    (_client_error("ThrottlingException", 400), "throttled"),
    (_client_error("ModelNotReadyException", 429), "unavailable"),
    (_client_error("ServiceUnavailable", 503), "unavailable"),
    (_client_error("InternalFailure", 500), "unavailable"),
    (ReadTimeoutError(endpoint_url="http://sm/endpoints/x/invocations"), "timeout"),
    (EndpointConnectionError(endpoint_url="http://sm"), "unavailable"),
])
def test_errors_map_to_a_kind_the_caller_can_act_on(error, kind):
    mapped = _invocation_error(error, "invoking endpoint 'x'")
    assert mapped.kind == kind and mapped.message.startswith("invoking endpoint 'x'")


def _runtime() -> SageMakerRuntime:
    return SageMakerRuntime(store=MemoryStore(), session=_session())


def _session():
    import boto3

    return boto3.Session(aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")


def test_a_model_error_is_the_containers_answer_or_an_invocation_error():
    runtime = _runtime()
    failed = Failed(job_id="j", message="out of memory", kind="oom").to_json()
    assert runtime._model_error("e", "j", _client_error("ModelError", 424, OriginalMessage=failed)) == \
        Failed(job_id="j", message="out of memory", kind="oom")
    refused = '{"error": "bad_request", "message": "`steps` must be 1..150", "field": "steps"}'
    assert runtime._model_error("e", "j", _client_error("ModelError", 424, OriginalMessage=refused)) == \
        Failed(job_id="j", message="`steps` must be 1..150", kind="bad_request", field="steps")
    for body, kind in (('{"error": "busy", "message": "all slots busy"}', "throttled"),
                       ('{"error": "stopping", "message": "stopping"}', "unavailable"),
                       ("<html>502 Bad Gateway</html>", "model_error")):
        with pytest.raises(InvocationError) as caught:
            runtime._model_error("e", "j", _client_error("ModelError", 424, OriginalMessage=body,
                                                         OriginalStatusCode=502))
        assert caught.value.kind == kind


def test_container_answers_and_progress_objects_decode():
    done = Succeeded(job_id="j", image_keys=("jobs/j/0.png",))
    assert container_answer("j", done.to_json()) == done
    assert container_answer("j", '{"type": "progress", "job_id": "j", "step": 1, "total": 2}') is None
    assert container_answer("j", b"\xff not json") is None
    document = {"job_id": "j", "status": "running", "step": 3, "total": 8, "job_no": 0, "job_count": 1,
                "fraction": 0.375, "eta": 1.5, "preview_png": None, "phase": "base"}
    progress = progress_from_document(document, "j")
    assert (progress.step, progress.total, progress.eta, progress.fraction) == (3, 8, 1.5, 0.375)
    assert progress_from_document({"step": "many"}, "j") is None


def test_inference_ids_and_attributes_respect_sagemakers_limits():
    assert inference_id_for(fake_spec("job-7")).startswith("job-7-1-")
    long_id = inference_id_for(fake_spec("x" * 80))
    assert len(long_id) == 32 and "x" not in long_id
    assert custom_attributes(progress="p/1.json", results="jobs/1") == "progress=p/1.json,results=jobs/1"
    with pytest.raises(ValueError, match="without ','"):
        custom_attributes(results="jobs/a,b")
    with pytest.raises(ValueError, match="1024"):
        custom_attributes(results="k" * 1100)


def test_the_handle_round_trips_and_old_rows_without_a_job_id_load():
    handle = AsyncHandle(inference_id="i", input_key="sagemaker/inputs/i.json", output_location="s3://b/o/i.out",
                         failure_location="", progress_key="sagemaker/progress/i.json", submitted_at=1.5, job_id="j")
    assert AsyncHandle.from_dict(handle.to_dict()) == handle
    data = handle.to_dict()
    del data["job_id"]
    assert AsyncHandle.from_dict(data).job_id == ""


def test_the_read_timeout_is_never_below_sagemakers_60_seconds():
    assert _runtime().timeout_seconds == 70.0
    assert SageMakerRuntime(store=MemoryStore(), session=_session(), timeout_seconds=5).timeout_seconds == 70.0
    assert SageMakerRuntime(store=MemoryStore(), session=_session(), timeout_seconds=120)._client.meta.config \
        .read_timeout == 120.0
