"""Invoking SageMaker endpoints that run the studio's serving container: real-time and async.

The container (``deploy/container/server.py``) speaks SageMaker's ``POST /invocations``; this module is the
studio's side of it, through ``boto3.client("sagemaker-runtime")`` built the ordinary way (credentials, region
and ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME`` / ``AWS_ENDPOINT_URL`` come from the environment).

Why the asset store is in the loop: a real-time invocation carries at most 6 MB each way, so a spec over
``INLINE_SPEC_BYTES`` goes to the store and travels as ``spec=<key>``, and images always come back as store keys
(``results=jobs/<job_id>``, where the control plane keeps a job's images) — the container shares the store.
An async invocation reads its input from S3 and writes its answer there (``{S3OutputPath}/{id}.out``, or
``{S3FailurePath}/{id}-error.out`` when the container answered an error status, as it does for a failed job);
steps and previews arrive as the progress object the container writes to ``progress=<key>``. Nothing of an
async job lives only in this process: ``AsyncHandle`` names every object, so after a restart a new
``SageMakerRuntime`` polls with the stored handle.

Errors: a job's own failure is a ``Failed`` event (the container's message and kind); ``InvocationError`` is
for invocations that produced no job outcome (unknown endpoint, throttling, network, timeout, an answer that
is not the container's). Nothing is retried here: re-sending a real-time invocation could run a job twice,
so the caller (the backend and its queue) decides.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from deploy.backends.messages import (
    TERMINAL_EVENTS,
    Event,
    Failed,
    JobSpec,
    MessageError,
    Progress,
    event_from_dict,
)
from deploy.storage import BlobNotFound, BlobStore, StorageError, validate_key

log = logging.getLogger(__name__)

InvocationErrorKind = Literal["model_error", "validation", "throttled", "unavailable", "timeout"]

INLINE_SPEC_BYTES = 5_500_000
"""Largest spec JSON sent in the request body; SageMaker's real-time limit is 6,291,456 bytes."""
INVOCATION_TIMEOUT_SECONDS = 3600
"""An async invocation may run this long in the container (SageMaker's maximum)."""
MIN_READ_TIMEOUT = 70.0
"""SageMaker gives a real-time container 60 s to answer; the client must wait longer than that."""
MAX_ATTRIBUTES = 1024
"""SageMaker's limit on ``X-Amzn-SageMaker-Custom-Attributes``."""
MAX_INFERENCE_ID = 64
BAD_INPUT_CODES = frozenset({"bad_spec", "bad_request", "bad_attributes", "too_large", "no_store"})
"""Container error codes that blame the request: the job fails ``bad_request`` and is not run again."""
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
_THROTTLED = frozenset({"ThrottlingException", "Throttling", "TooManyRequestsException"})
_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})


class InvocationError(RuntimeError):
    """An invocation that produced no job outcome; ``kind`` tells the caller whether to retry:
    ``validation`` (unknown endpoint, refused input: no), ``throttled`` / ``unavailable`` / ``timeout`` (later,
    maybe elsewhere), ``model_error`` (the endpoint answered something that is not the container's)."""

    def __init__(self, kind: InvocationErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class AsyncHandle:
    """Everything needed to collect one async invocation, JSON-safe (stored on the job row before it runs)."""

    inference_id: str
    input_key: str
    """Store key of the spec (the runtime's store)."""
    output_location: str
    """``s3://bucket/key`` SageMaker writes the container's answer to."""
    failure_location: str
    """``s3://bucket/key`` of the error answer ("" when the endpoint has no failure path)."""
    progress_key: str
    """Store key the container writes progress to."""
    submitted_at: float
    """Epoch seconds."""
    job_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AsyncHandle:
        try:
            return cls(inference_id=str(data["inference_id"]), input_key=str(data["input_key"]),
                       output_location=str(data["output_location"]),
                       failure_location=str(data.get("failure_location") or ""),
                       progress_key=str(data["progress_key"]), submitted_at=float(data["submitted_at"]),
                       job_id=str(data.get("job_id") or ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an async invocation handle: {exc!r}") from None


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → (bucket, key); ``ValueError`` naming the URI otherwise."""
    scheme, _, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if scheme != "s3" or not bucket or not key:
        raise ValueError(f"expected an s3://bucket/key location, got {uri!r}")
    return bucket, key


def inference_id_for(spec: JobSpec) -> str:
    """``<job id>-<attempt>-<random>`` (readable in SageMaker's logs, never reused), or a bare uuid when the job
    id is too long or not printable ASCII (SageMaker: 1-64 printable characters)."""
    suffix = uuid.uuid4().hex[:8]
    candidate = f"{spec.job_id}-{spec.attempt}-{suffix}"
    if len(candidate) <= MAX_INFERENCE_ID and _PRINTABLE.match(candidate):
        return candidate
    return uuid.uuid4().hex


def custom_attributes(**values: str) -> str:
    """``a=1,b=2`` for ``X-Amzn-SageMaker-Custom-Attributes``; values must not hold ``,`` or ``=`` (the container
    splits on them) and the whole must fit SageMaker's 1024 ASCII characters."""
    for name, value in values.items():
        if "," in value or "=" in value or not value.isascii():
            raise ValueError(f"custom attribute {name}={value!r} must be ASCII without ',' or '='")
    text = ",".join(f"{name}={value}" for name, value in values.items())
    if len(text) > MAX_ATTRIBUTES:
        raise ValueError(f"custom attributes are {len(text)} characters; SageMaker allows {MAX_ATTRIBUTES}")
    return text


def container_answer(job_id: str, body: bytes | str) -> Event | dict[str, Any] | None:
    """What the container answered: a terminal event, its error object ``{"error", "message", ...}``, or None
    when the body is neither (a proxy's page, SageMaker's own text)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    if "error" in document and "type" not in document:
        return document
    try:
        event = event_from_dict(document)
    except (MessageError, ValueError, TypeError):
        return None
    if not isinstance(event, TERMINAL_EVENTS):
        return None
    if event.job_id != job_id and job_id:
        log.warning("the container answered job %s for job %s", event.job_id, job_id)
    return event


def failed_from_error(job_id: str, error: Mapping[str, Any]) -> Failed:
    """The container refused the request (``{"error": code, ...}``): the job's failure, naming its field."""
    code = str(error.get("error"))
    message = str(error.get("message") or code)
    if code in ("busy", "stopping"):
        return Failed(job_id=job_id, message=message, kind="interrupted")
    kind = "bad_request" if code in BAD_INPUT_CODES else "internal"
    field = error.get("field")
    return Failed(job_id=job_id, message=message, kind=kind, field=str(field) if field else None)


def progress_from_document(document: Mapping[str, Any], job_id: str) -> Progress | None:
    """The container's progress object (``deploy.container.progress.snapshot``) as a ``Progress`` event."""
    try:
        eta = document.get("eta")
        return Progress(job_id=str(document.get("job_id") or job_id), step=int(document.get("step") or 0),
                        total=int(document.get("total") or 0), job_no=int(document.get("job_no") or 0),
                        job_count=int(document.get("job_count") or 1), eta=float(eta) if eta is not None else None,
                        preview_png=document.get("preview_png") or None, phase=str(document.get("phase") or "base"))
    except (TypeError, ValueError):
        log.warning("unreadable progress object for job %s", job_id)
        return None


def _client_error_kind(exc: ClientError) -> tuple[str, InvocationErrorKind]:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in ("ValidationError", "ValidationException"):
        return code, "validation"
    if code in _THROTTLED or (status == 429 and code != "ModelNotReadyException"):
        return code, "throttled"
    if status >= 500 or code == "ModelNotReadyException" or not status:
        return code, "unavailable"
    return code, "validation"


def _invocation_error(exc: Exception, what: str) -> InvocationError:
    if isinstance(exc, ClientError):
        code, kind = _client_error_kind(exc)
        message = exc.response.get("Error", {}).get("Message") or str(exc)
        return InvocationError(kind, f"{what}: {code}: {message}")
    if isinstance(exc, ReadTimeoutError):
        return InvocationError("timeout", f"{what}: no answer in time ({exc})")
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError):
        return InvocationError("unavailable", f"{what}: {exc}")
    return InvocationError("unavailable", f"{what}: {exc}")


def _storage_error(exc: Exception, what: str) -> InvocationError:
    """S3 failed (a missing bucket, a denied read, the network): the answer may be there, unreadable for now."""
    return InvocationError("unavailable", _invocation_error(exc, what).message)


class SageMakerRuntime:
    """Real-time and async invocations of the studio's container; thread-safe (boto3 clients are)."""

    def __init__(self, *, store: BlobStore, prefix: str = "sagemaker/", timeout_seconds: float = 70.0,
                 session: boto3.Session | None = None) -> None:
        prefix = prefix.strip("/")
        validate_key(prefix)
        self.store = store
        self.prefix = prefix
        self.timeout_seconds = max(MIN_READ_TIMEOUT, float(timeout_seconds))
        self._session = session or boto3.Session()
        # One attempt: a retried real-time invocation could run the job twice (see the module docstring).
        config = Config(read_timeout=self.timeout_seconds, connect_timeout=10,
                        retries={"total_max_attempts": 1, "mode": "standard"})
        self._client = self._session.client("sagemaker-runtime", config=config)
        self._s3_client: Any = None

    # -- real-time -----------------------------------------------------------------------------------------
    def invoke(self, endpoint: str, spec: JobSpec, *, results_prefix: str | None = None) -> Event:
        """Run ``spec`` on a real-time ``endpoint``: its terminal event (images as store keys under
        ``results_prefix``, by default ``jobs/<job_id>``). ``InvocationError`` when no job outcome came back."""
        results = (results_prefix or f"jobs/{spec.job_id}").rstrip("/")
        validate_key(results)
        body = spec.to_json().encode("utf-8")
        spec_key = None
        if len(body) > INLINE_SPEC_BYTES:
            spec_key = f"{self.prefix}/inputs/{uuid.uuid4().hex}.json"
            self._put(spec_key, body)
            body = b"{}"
        attributes = custom_attributes(results=results, **({"spec": spec_key} if spec_key else {}))
        try:
            response = self._client.invoke_endpoint(EndpointName=endpoint, Body=body, ContentType="application/json",
                                                    Accept="application/json", CustomAttributes=attributes)
            answer = response["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ModelError":
                raise _invocation_error(exc, f"invoking endpoint {endpoint!r}") from exc
            return self._model_error(endpoint, spec.job_id, exc)
        except BotoCoreError as exc:
            raise _invocation_error(exc, f"invoking endpoint {endpoint!r}") from exc
        finally:
            if spec_key is not None:
                self._delete(spec_key)
        event = container_answer(spec.job_id, answer)
        if not isinstance(event, TERMINAL_EVENTS):
            raise InvocationError("model_error", f"endpoint {endpoint!r} answered something other than a job "
                                  f"event: {answer[:200]!r}")
        return event

    def _model_error(self, endpoint: str, job_id: str, exc: ClientError) -> Event:
        """SageMaker's 424: the container answered an error status; its body is ``OriginalMessage``."""
        original = str(exc.response.get("OriginalMessage") or "")
        answer = container_answer(job_id, original)
        if isinstance(answer, dict):
            if answer.get("error") == "busy":
                raise InvocationError("throttled", f"endpoint {endpoint!r}: {answer.get('message')}") from exc
            if answer.get("error") == "stopping":
                raise InvocationError("unavailable", f"endpoint {endpoint!r}: {answer.get('message')}") from exc
            return failed_from_error(job_id, answer)
        if answer is None:
            status = exc.response.get("OriginalStatusCode")
            raise InvocationError("model_error", f"endpoint {endpoint!r}: the container answered {status}: "
                                  f"{original[:500] or exc}") from exc
        return answer

    # -- async ---------------------------------------------------------------------------------------------
    def submit_async(self, endpoint: str, spec: JobSpec, *, results_prefix: str | None = None) -> AsyncHandle:
        """Queue ``spec`` on an async ``endpoint`` and return at once with the handle to collect it."""
        bucket, object_prefix = self._s3_store()
        inference_id = inference_id_for(spec)
        input_key = f"{self.prefix}/inputs/{inference_id}.json"
        progress_key = f"{self.prefix}/progress/{inference_id}.json"
        results = (results_prefix or f"jobs/{spec.job_id}").rstrip("/")
        validate_key(results)
        attributes = custom_attributes(progress=progress_key, results=results)
        self._put(input_key, spec.to_json().encode("utf-8"))
        location = f"s3://{bucket}/{object_prefix}{input_key}"
        try:
            response = self._client.invoke_endpoint_async(
                EndpointName=endpoint, InputLocation=location, ContentType="application/json",
                Accept="application/json", CustomAttributes=attributes, InferenceId=inference_id,
                InvocationTimeoutSeconds=INVOCATION_TIMEOUT_SECONDS)
        except (ClientError, BotoCoreError) as exc:
            self._delete(input_key)
            raise _invocation_error(exc, f"queueing job {spec.job_id} on endpoint {endpoint!r}") from exc
        return AsyncHandle(inference_id=str(response.get("InferenceId") or inference_id), input_key=input_key,
                           output_location=str(response["OutputLocation"]),
                           failure_location=str(response.get("FailureLocation") or ""),
                           progress_key=progress_key, submitted_at=time.time(), job_id=spec.job_id)

    def poll(self, handle: AsyncHandle) -> Event | None:
        """One look: the terminal event once SageMaker wrote the answer, else the latest ``Progress`` (None before
        the container wrote any). ``InvocationError("unavailable")`` when S3 or the store cannot be read."""
        answer = self._read_location(handle.output_location)
        if answer is not None:
            event = container_answer(handle.job_id, answer)
            if isinstance(event, dict):
                return failed_from_error(handle.job_id, event)
            if event is None:
                return Failed(job_id=handle.job_id, kind="internal",
                              message=f"unreadable answer at {handle.output_location}: {answer[:200]!r}")
            return event
        failure = self._read_location(handle.failure_location) if handle.failure_location else None
        if failure is not None:
            event = container_answer(handle.job_id, failure)
            if isinstance(event, dict):
                return failed_from_error(handle.job_id, event)
            if event is None:  # SageMaker's own failure text (a timeout, an unreachable container)
                return Failed(job_id=handle.job_id, kind="internal",
                              message=failure.decode("utf-8", "replace")[:2000] or "the invocation failed")
            return event
        return self._progress(handle)

    def cleanup(self, handle: AsyncHandle) -> None:
        """Delete the invocation's objects (input, output, failure, progress); absent ones are fine. The job's
        images stay: they are the result."""
        for key in (handle.input_key, handle.progress_key):
            self._delete(key, quiet=False)
        for location in (handle.output_location, handle.failure_location):
            if location:
                bucket, key = split_s3_uri(location)
                try:
                    self._s3().delete_object(Bucket=bucket, Key=key)
                except (ClientError, BotoCoreError) as exc:
                    raise _storage_error(exc, f"deleting {location}") from exc

    # -- plumbing ------------------------------------------------------------------------------------------
    def _s3_store(self) -> tuple[str, str]:
        """The store's bucket and object-key prefix (``"studio/"`` or ``""``): async inputs must be in S3."""
        bucket = getattr(self.store, "bucket", None)
        object_prefix = getattr(self.store, "prefix", None)
        if not isinstance(bucket, str) or not isinstance(object_prefix, str):
            raise ValueError(f"async SageMaker invocations need an S3 asset store (s3://bucket/prefix): SageMaker "
                             f"reads the input from S3; this studio's store is {self.store!r}")
        return bucket, f"{object_prefix}/" if object_prefix else ""

    def _s3(self) -> Any:
        if self._s3_client is None:
            config = Config(signature_version="s3v4", retries={"mode": "standard"})
            self._s3_client = self._session.client("s3", config=config)
        return self._s3_client

    def _read_location(self, location: str) -> bytes | None:
        bucket, key = split_s3_uri(location)
        try:
            return self._s3().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND:
                return None
            raise _storage_error(exc, f"reading {location}") from exc
        except BotoCoreError as exc:
            raise _storage_error(exc, f"reading {location}") from exc

    def _progress(self, handle: AsyncHandle) -> Progress | None:
        try:
            with self.store.open(handle.progress_key) as stream:
                data = stream.read()
        except BlobNotFound:
            return None
        except (StorageError, OSError) as exc:
            raise InvocationError("unavailable", f"reading progress {handle.progress_key}: {exc}") from exc
        try:
            document = json.loads(data)
        except ValueError:
            return None
        return progress_from_document(document, handle.job_id) if isinstance(document, dict) else None

    def _put(self, key: str, data: bytes) -> None:
        try:
            self.store.put(key, io.BytesIO(data), content_type="application/json")
        except (StorageError, OSError) as exc:
            raise InvocationError("unavailable", f"storing the job spec at {key}: {exc}") from exc

    def _delete(self, key: str, *, quiet: bool = True) -> None:
        try:
            self.store.delete(key)
        except BlobNotFound:
            pass
        except (StorageError, OSError) as exc:
            if not quiet:
                raise InvocationError("unavailable", f"deleting {key}: {exc}") from exc
            log.warning("could not delete %s: %s", key, exc)
