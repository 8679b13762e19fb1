"""The SageMaker control plane for studio endpoints: create, autoscale, describe, list and delete.

Why a layer of its own: the backend and the UI think in one "endpoint", while SageMaker wants three
resources (model -> endpoint config -> endpoint) plus, for autoscaling, a scalable target, policies and
for async scale-from-zero a CloudWatch alarm we must create and delete ourselves. This module keeps
those in step:

- ``EndpointPlan`` is validated when built (``PlanError.field`` names the bad option), so a plan that
  exists can be sent; the checks are SageMaker's own limits, caught before any call is made.
- ``plan_arguments`` / ``scaling_arguments`` are pure: the exact boto3 arguments, assertable in tests.
- ``create`` leaves no orphans: if a later call fails it deletes what *this call* created (never a
  same-named resource someone else made, since that makes our first call fail), then raises.
- ``delete`` and ``apply_scaling`` are idempotent, so a reconcile loop may repeat them freely.
- Every failure is a ``CloudError`` naming the call and AWS's message (botocore messages carry no
  credentials).

The model and endpoint config carry the endpoint's name (one name for all three, as SageMaker's own
examples do), so ``delete`` finds them from the name alone. Clients are built the ordinary way:
credentials, region and ``AWS_ENDPOINT_URL*`` come from the environment; retries are botocore's
"standard" mode with its default 3 attempts, which ``AWS_MAX_ATTEMPTS`` (or a session's config) may
change. No status polling lives here: the backend's reconcile loop decides what "stuck" means.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

logger = logging.getLogger(__name__)

MANAGED_TAG = "studio:managed"
ENDPOINT_TAG = "studio:endpoint"
RESERVED_TAGS = frozenset({MANAGED_TAG, ENDPOINT_TAG})

NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
METRIC_NAMESPACE = "AWS/SageMaker"
ASYNC_METRIC = "ApproximateBacklogSizePerInstance"
REALTIME_METRIC = "SageMakerVariantInvocationsPerInstance"
FROM_ZERO_METRIC = "HasBacklogWithoutCapacity"
DEFAULT_TARGET = {"async": 3.0, "realtime": 5.0}
# The scale-from-zero step adds one instance per firing; a cold start takes minutes, so a short
# cooldown would stack instances while the first one is still booting.
FROM_ZERO_COOLDOWN = 180
FROM_ZERO_PERIOD = 60

MAX_NAME = 63
MAX_ENV_ENTRIES = 100
MAX_ENV_CHARS = 1024
MAX_TAGS = 50  # per SageMaker resource, the studio's own two included

_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*")
_ENV_KEY = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
ROLE_ARN = re.compile(r"arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-/]+")
_IMAGE_URI = re.compile(r"\S{1,255}")
_INSTANCE_TYPE = re.compile(r"ml\.[a-z0-9]+\.[a-z0-9]+")
_S3_PATH = re.compile(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/\S*)?")
_SNS_ARN = re.compile(r"arn:aws[a-z\-]*:sns:[a-z0-9\-]+:\d{12}:[A-Za-z0-9_\-]{1,256}(\.fifo)?")
_MISSING_CODES = frozenset({"ResourceNotFound", "ResourceNotFoundException", "ObjectNotFoundException"})
_MISSING_MESSAGES = ("Could not find", "No scalable target found", "No scaling policy found")


class PlanError(ValueError):
    """A plan breaks a SageMaker rule; ``field`` names the option (``options.<attribute>``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class CloudError(RuntimeError):
    """A control-plane call failed. ``operation`` is e.g. ``sagemaker.create_endpoint``; ``code`` is
    AWS's error code (or the botocore exception's name) and ``aws_message`` its message."""

    def __init__(self, operation: str, code: str, aws_message: str) -> None:
        super().__init__(f"{operation} failed: {code}: {aws_message}")
        self.operation = operation
        self.code = code
        self.aws_message = aws_message

    @property
    def is_missing(self) -> bool:
        """The resource does not exist (what idempotent deletes and describe treat as "nothing to do")."""
        if self.code in _MISSING_CODES:
            return True
        return self.code == "ValidationException" and any(m in self.aws_message for m in _MISSING_MESSAGES)


@dataclass(frozen=True)
class ScalingPlan:
    """Autoscaling of the endpoint's variant; validated with its `EndpointPlan` (fields ``options.scaling.*``)."""

    enabled: bool = True
    min_instances: int = 1
    max_instances: int = 1
    target_value: float | None = None  # None: async 3 (backlog per instance), real-time 5 (invocations/min)
    scale_in_cooldown: int = 180
    scale_out_cooldown: int = 60


@dataclass(frozen=True)
class EndpointPlan:
    """Everything needed to create one endpoint. Async-only fields (output/failure paths, topics,
    concurrency) are not sent for real-time endpoints. ``invocation_timeout_seconds`` is for the runtime."""

    name: str
    endpoint_type: Literal["async", "realtime"]
    image_uri: str
    role_arn: str
    instance_type: str = "ml.g5.2xlarge"
    initial_instances: int = 1
    environment: Mapping[str, str] = field(default_factory=dict)
    output_path: str | None = None
    failure_path: str | None = None
    success_topic: str | None = None
    error_topic: str | None = None
    max_concurrent_invocations: int = 1
    invocation_timeout_seconds: int = 3600
    variant: str = "AllTraffic"
    scaling: ScalingPlan = field(default_factory=ScalingPlan)
    tags: Mapping[str, str] = field(default_factory=dict)
    model_data_download_timeout: int = 1200
    startup_health_check_timeout: int = 3600

    def __post_init__(self) -> None:
        # Private copies: a caller mutating its dict later must not change a validated plan.
        object.__setattr__(self, "environment", dict(self.environment))
        object.__setattr__(self, "tags", dict(self.tags))
        validate_plan(self)


# -- validation ----------------------------------------------------------------------------------------


def _fail(attribute: str, message: str) -> PlanError:
    return PlanError(f"{attribute}: {message}", field=f"options.{attribute}")


def _check_int(attribute: str, value: object, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(attribute, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _fail(attribute, f"must be {bounds}, got {value}")


def validate_name(attribute: str, value: object) -> None:
    """SageMaker's rule for endpoint, config, model and variant names."""
    if not isinstance(value, str) or not value:
        raise _fail(attribute, f"must be a non-empty name, got {value!r}")
    if len(value) > MAX_NAME:
        raise _fail(attribute, f"must be at most {MAX_NAME} characters, got {len(value)} ({value!r})")
    if not _NAME.fullmatch(value):
        raise _fail(attribute, f"may hold only letters, digits and inner hyphens, got {value!r}")


def _check_pattern(attribute: str, value: object, pattern: re.Pattern[str], what: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _fail(attribute, f"must be {what}, got {value!r}")


def _check_environment(environment: Mapping[str, str]) -> None:
    if len(environment) > MAX_ENV_ENTRIES:
        raise _fail("environment", f"at most {MAX_ENV_ENTRIES} entries, got {len(environment)}")
    for key, value in environment.items():
        if not isinstance(key, str) or len(key) > MAX_ENV_CHARS or not _ENV_KEY.fullmatch(key):
            raise _fail("environment", f"names must match [a-zA-Z_][a-zA-Z0-9_]* (<= {MAX_ENV_CHARS}), got {key!r}")
        if not isinstance(value, str) or len(value) > MAX_ENV_CHARS:
            shown = f"{len(value)} characters" if isinstance(value, str) else repr(value)
            raise _fail("environment", f"{key} must be a string of at most {MAX_ENV_CHARS} characters, got {shown}")


def _check_tags(tags: Mapping[str, str]) -> None:
    if len(tags) > MAX_TAGS - len(RESERVED_TAGS):
        raise _fail("tags", f"at most {MAX_TAGS - len(RESERVED_TAGS)} tags (the studio adds its own), got {len(tags)}")
    for key, value in tags.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 128 or key.lower().startswith("aws:"):
            raise _fail("tags", f"keys must be 1-128 characters and not start with aws:, got {key!r}")
        if key in RESERVED_TAGS:
            raise _fail("tags", f"{key!r} is set by the studio itself")
        if not isinstance(value, str) or len(value) > 256:
            raise _fail("tags", f"the value of {key!r} must be a string of at most 256 characters")


def _check_scaling(plan: EndpointPlan) -> None:
    scaling = plan.scaling
    if not isinstance(scaling, ScalingPlan):
        raise _fail("scaling", f"must be a ScalingPlan, got {type(scaling).__name__}")
    if not scaling.enabled:
        return
    lowest = 0 if plan.endpoint_type == "async" else 1
    if plan.endpoint_type == "realtime" and scaling.min_instances == 0:
        raise _fail("scaling.min_instances", "real-time endpoints cannot scale to zero (use an async endpoint); got 0")
    _check_int("scaling.min_instances", scaling.min_instances, lowest)
    _check_int("scaling.max_instances", scaling.max_instances, max(1, scaling.min_instances))
    if plan.initial_instances > scaling.max_instances:
        raise _fail("initial_instances", f"{plan.initial_instances} exceeds scaling.max_instances ({scaling.max_instances})")
    target = scaling.target_value
    if target is not None and (isinstance(target, bool) or not isinstance(target, int | float)
                               or not 0 < target < math.inf):
        raise _fail("scaling.target_value", f"must be a positive number, got {target!r}")
    _check_int("scaling.scale_in_cooldown", scaling.scale_in_cooldown, 0, 86400)
    _check_int("scaling.scale_out_cooldown", scaling.scale_out_cooldown, 0, 86400)


def validate_plan(plan: EndpointPlan) -> None:
    """Raise `PlanError` for the first option SageMaker would reject (run by ``EndpointPlan`` itself)."""
    validate_name("name", plan.name)
    if plan.endpoint_type not in ("async", "realtime"):
        raise _fail("endpoint_type", f"must be 'async' or 'realtime', got {plan.endpoint_type!r}")
    _check_pattern("image_uri", plan.image_uri, _IMAGE_URI, "an image URI (ECR), at most 255 characters")
    _check_pattern("role_arn", plan.role_arn, ROLE_ARN, "an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    _check_pattern("instance_type", plan.instance_type, _INSTANCE_TYPE, "a SageMaker instance type such as ml.g5.2xlarge")
    _check_int("initial_instances", plan.initial_instances, 1)
    _check_environment(plan.environment)
    if plan.endpoint_type == "async":
        if plan.output_path is None:
            raise _fail("output_path", "async endpoints need an s3://bucket/prefix/ for their results")
        _check_pattern("output_path", plan.output_path, _S3_PATH, "an s3://bucket/prefix/ URI")
        if plan.failure_path is not None:
            _check_pattern("failure_path", plan.failure_path, _S3_PATH, "an s3://bucket/prefix/ URI")
        for attribute in ("success_topic", "error_topic"):
            if getattr(plan, attribute) is not None:
                _check_pattern(attribute, getattr(plan, attribute), _SNS_ARN, "an SNS topic ARN")
        _check_int("max_concurrent_invocations", plan.max_concurrent_invocations, 1, 1000)
    _check_int("invocation_timeout_seconds", plan.invocation_timeout_seconds, 1, 3600)
    validate_name("variant", plan.variant)
    _check_int("model_data_download_timeout", plan.model_data_download_timeout, 60, 3600)
    _check_int("startup_health_check_timeout", plan.startup_health_check_timeout, 60, 3600)
    _check_tags(plan.tags)
    _check_scaling(plan)


# -- names and arguments (pure) ------------------------------------------------------------------------


def model_name(endpoint: str) -> str:
    return endpoint


def config_name(endpoint: str) -> str:
    return endpoint


def resource_id(endpoint: str, variant: str) -> str:
    return f"endpoint/{endpoint}/variant/{variant}"


def target_policy_name(endpoint: str, endpoint_type: str) -> str:
    return f"{endpoint}-{'backlog' if endpoint_type == 'async' else 'invocations'}-per-instance"


def from_zero_policy_name(endpoint: str) -> str:
    return f"{endpoint}-backlog-without-capacity"


def from_zero_alarm_name(endpoint: str) -> str:
    return f"{endpoint}-backlog-without-capacity"


def _tag_list(plan: EndpointPlan) -> list[dict[str, str]]:
    tags = {**plan.tags, MANAGED_TAG: "true", ENDPOINT_TAG: plan.name}
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def _async_config(plan: EndpointPlan) -> dict[str, Any]:
    output: dict[str, Any] = {"S3OutputPath": plan.output_path}
    if plan.failure_path:
        output["S3FailurePath"] = plan.failure_path
    notification = {key: value for key, value in (("SuccessTopic", plan.success_topic),
                                                  ("ErrorTopic", plan.error_topic)) if value}
    if notification:
        output["NotificationConfig"] = notification
    return {"ClientConfig": {"MaxConcurrentInvocationsPerInstance": plan.max_concurrent_invocations},
            "OutputConfig": output}


def plan_arguments(plan: EndpointPlan) -> dict[str, dict[str, Any]]:
    """The keyword arguments of ``create_model``, ``create_endpoint_config`` and ``create_endpoint``."""
    tags = _tag_list(plan)
    model = {
        "ModelName": model_name(plan.name),
        "ExecutionRoleArn": plan.role_arn,
        "PrimaryContainer": {"Image": plan.image_uri, "Mode": "SingleModel", "Environment": dict(plan.environment)},
        "Tags": tags,
    }
    variant = {
        "VariantName": plan.variant,
        "ModelName": model_name(plan.name),
        "InstanceType": plan.instance_type,
        "InitialInstanceCount": plan.initial_instances,
        "InitialVariantWeight": 1.0,
        "ModelDataDownloadTimeoutInSeconds": plan.model_data_download_timeout,
        "ContainerStartupHealthCheckTimeoutInSeconds": plan.startup_health_check_timeout,
    }
    config: dict[str, Any] = {"EndpointConfigName": config_name(plan.name), "ProductionVariants": [variant], "Tags": tags}
    if plan.endpoint_type == "async":
        config["AsyncInferenceConfig"] = _async_config(plan)
    endpoint = {"EndpointName": plan.name, "EndpointConfigName": config_name(plan.name), "Tags": tags}
    return {"create_model": model, "create_endpoint_config": config, "create_endpoint": endpoint}


@dataclass(frozen=True)
class ScalingCalls:
    """The arguments ``apply_scaling`` sends: ``register`` (register_scalable_target), ``tracking``
    (put_scaling_policy), and for async ``step`` (put_scaling_policy) and ``alarm`` (put_metric_alarm,
    whose ``AlarmActions`` is the step policy's ARN, known only after that put)."""

    register: dict[str, Any]
    tracking: dict[str, Any]
    step: dict[str, Any] | None = None
    alarm: dict[str, Any] | None = None


def scaling_arguments(plan: EndpointPlan) -> ScalingCalls | None:
    """What ``apply_scaling`` sends for ``plan``, or None when its scaling is disabled."""
    scaling = plan.scaling
    if not scaling.enabled:
        return None
    target_key = {"ServiceNamespace": NAMESPACE, "ResourceId": resource_id(plan.name, plan.variant),
                  "ScalableDimension": DIMENSION}
    register = {**target_key, "MinCapacity": scaling.min_instances, "MaxCapacity": scaling.max_instances}
    dimensions = [{"Name": "EndpointName", "Value": plan.name}]
    if plan.endpoint_type == "async":
        metric: dict[str, Any] = {"CustomizedMetricSpecification": {
            "MetricName": ASYNC_METRIC, "Namespace": METRIC_NAMESPACE, "Dimensions": dimensions, "Statistic": "Average"}}
    else:
        metric = {"PredefinedMetricSpecification": {"PredefinedMetricType": REALTIME_METRIC}}
    target_value = scaling.target_value if scaling.target_value is not None else DEFAULT_TARGET[plan.endpoint_type]
    tracking = {**target_key, "PolicyName": target_policy_name(plan.name, plan.endpoint_type),
                "PolicyType": "TargetTrackingScaling",
                "TargetTrackingScalingPolicyConfiguration": {
                    "TargetValue": float(target_value), **metric,
                    "ScaleInCooldown": scaling.scale_in_cooldown, "ScaleOutCooldown": scaling.scale_out_cooldown}}
    step = alarm = None
    if plan.endpoint_type == "async":
        # Backlog *per instance* is undefined at zero instances, so target tracking alone never leaves 0.
        step = {**target_key, "PolicyName": from_zero_policy_name(plan.name), "PolicyType": "StepScaling",
                "StepScalingPolicyConfiguration": {
                    "AdjustmentType": "ChangeInCapacity", "MetricAggregationType": "Average",
                    "Cooldown": FROM_ZERO_COOLDOWN,
                    "StepAdjustments": [{"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}]}}
        alarm = {"AlarmName": from_zero_alarm_name(plan.name),
                 "AlarmDescription": f"Scale studio endpoint {plan.name} out from zero when requests wait",
                 "Namespace": METRIC_NAMESPACE, "MetricName": FROM_ZERO_METRIC, "Dimensions": dimensions,
                 "Statistic": "Average", "Period": FROM_ZERO_PERIOD, "EvaluationPeriods": 1, "DatapointsToAlarm": 1,
                 "Threshold": 1.0, "ComparisonOperator": "GreaterThanOrEqualToThreshold",
                 "TreatMissingData": "missing", "Tags": _tag_list(plan)}
    return ScalingCalls(register=register, tracking=tracking, step=step, alarm=alarm)


# -- what describe answers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CloudEndpoint:
    """One endpoint as SageMaker reports it; ``status`` is its EndpointStatus verbatim."""

    name: str
    status: str
    failure_reason: str | None
    endpoint_type: str
    current_instances: int | None
    desired_instances: int | None
    config_name: str | None
    managed: bool
    created_at: datetime | None
    last_modified: datetime | None


def _instance_sum(variants: list[dict[str, Any]], key: str) -> int | None:
    counts = [variant[key] for variant in variants if isinstance(variant.get(key), int)]
    return sum(counts) if counts else None


# -- the client ----------------------------------------------------------------------------------------


class SageMakerControl:
    """Control-plane calls for studio endpoints; thread-safe (boto3 clients are)."""

    def __init__(self, *, region: str | None = None, session: boto3.session.Session | None = None) -> None:
        session = session or boto3.session.Session()
        config = Config(retries={"mode": "standard"})
        try:
            self._sm = session.client("sagemaker", region_name=region, config=config)
            self._aas = session.client("application-autoscaling", region_name=region, config=config)
            self._cw = session.client("cloudwatch", region_name=region, config=config)
        except BotoCoreError as exc:  # e.g. NoRegionError: no region configured anywhere
            raise CloudError("boto3.client", type(exc).__name__, str(exc)) from exc

    def close(self) -> None:
        for client in (self._sm, self._aas, self._cw):
            client.close()

    def __enter__(self) -> SageMakerControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- endpoints -------------------------------------------------------------------------------------

    def create(self, plan: EndpointPlan) -> str:
        """Create model, config and endpoint (all tagged); return the endpoint ARN. On a failure,
        delete what this call created, then raise the `CloudError`."""
        arguments = plan_arguments(plan)
        created: list[tuple[str, dict[str, str]]] = []
        try:
            _call(self._sm, "create_model", **arguments["create_model"])
            created.append(("delete_model", {"ModelName": model_name(plan.name)}))
            _call(self._sm, "create_endpoint_config", **arguments["create_endpoint_config"])
            created.append(("delete_endpoint_config", {"EndpointConfigName": config_name(plan.name)}))
            answer = _call(self._sm, "create_endpoint", **arguments["create_endpoint"])
        except BaseException:
            self._undo(created)
            raise
        logger.info("created SageMaker %s endpoint %s (%s)", plan.endpoint_type, plan.name, plan.instance_type)
        return str(answer["EndpointArn"])

    def _undo(self, created: list[tuple[str, dict[str, str]]]) -> None:
        for operation, arguments in reversed(created):
            try:
                _call(self._sm, operation, **arguments)
            except CloudError as exc:
                if not exc.is_missing:  # the original failure is what the caller needs; this one is logged
                    logger.warning("could not roll back %s after a failed create: %s", arguments, exc)

    def describe(self, name: str) -> CloudEndpoint | None:
        """The endpoint, or None when SageMaker does not know it."""
        try:
            endpoint = _call(self._sm, "describe_endpoint", EndpointName=name)
            tags = self._tags(endpoint["EndpointArn"])
        except CloudError as exc:
            if exc.is_missing:
                return None
            raise
        variants = endpoint.get("ProductionVariants") or []
        config = endpoint.get("EndpointConfigName")
        return CloudEndpoint(
            name=endpoint["EndpointName"],
            status=endpoint["EndpointStatus"],
            failure_reason=endpoint.get("FailureReason") or None,
            endpoint_type=self._endpoint_type(endpoint),
            current_instances=_instance_sum(variants, "CurrentInstanceCount"),
            desired_instances=_instance_sum(variants, "DesiredInstanceCount"),
            config_name=config,
            managed=tags.get(MANAGED_TAG) == "true",
            created_at=endpoint.get("CreationTime"),
            last_modified=endpoint.get("LastModifiedTime"),
        )

    def _endpoint_type(self, endpoint: dict[str, Any]) -> str:
        """From the endpoint config (describe_endpoint shows AsyncInferenceConfig only on some versions);
        a config deleted behind our back falls back to what describe_endpoint said."""
        if endpoint.get("AsyncInferenceConfig"):
            return "async"
        try:
            config = _call(self._sm, "describe_endpoint_config", EndpointConfigName=endpoint["EndpointConfigName"])
        except CloudError as exc:
            if exc.is_missing:
                return "realtime"
            raise
        return "async" if config.get("AsyncInferenceConfig") else "realtime"

    def _tags(self, arn: str) -> dict[str, str]:
        return {tag["Key"]: tag["Value"] for tag in _paginate(self._sm, "list_tags", "Tags", ResourceArn=arn)}

    def list_endpoints(self) -> list[CloudEndpoint]:
        """Every endpoint in the account and region, by name; three calls per endpoint (describe, its
        config, its tags), since the listing alone carries neither the type nor the tags."""
        names = [summary["EndpointName"] for summary in _paginate(self._sm, "list_endpoints", "Endpoints")]
        found = (self.describe(name) for name in sorted(set(names)))
        return [endpoint for endpoint in found if endpoint is not None]  # one deleted since the listing

    def set_instances(self, name: str, variant: str, count: int) -> None:
        """Ask for `count` instances of `variant` (manual scaling; autoscaling, if on, may change it)."""
        validate_name("name", name)
        validate_name("variant", variant)
        _check_int("instances", count, 0)
        _call(self._sm, "update_endpoint_weights_and_capacities", EndpointName=name,
              DesiredWeightsAndCapacities=[{"VariantName": variant, "DesiredInstanceCount": count}])

    def delete(self, name: str) -> None:
        """Remove autoscaling, the endpoint, its config and its model; missing pieces are fine."""
        validate_name("name", name)
        self.remove_scaling(name)
        for operation, arguments in (("delete_endpoint", {"EndpointName": name}),
                                     ("delete_endpoint_config", {"EndpointConfigName": config_name(name)}),
                                     ("delete_model", {"ModelName": model_name(name)})):
            try:
                _call(self._sm, operation, **arguments)
            except CloudError as exc:
                if not exc.is_missing:
                    raise
        logger.info("deleted SageMaker endpoint %s (and its config, model and scaling)", name)

    # -- autoscaling -----------------------------------------------------------------------------------

    def apply_scaling(self, plan: EndpointPlan) -> None:
        """Make the endpoint's autoscaling match ``plan.scaling`` (call once it is InService; repeatable).
        Policies of this endpoint that the plan does not name are removed, so a changed plan leaves no
        stale policy behind."""
        calls = scaling_arguments(plan)
        if calls is None:
            self.remove_scaling(plan.name)
            return
        _call(self._aas, "register_scalable_target", **calls.register)
        _call(self._aas, "put_scaling_policy", **calls.tracking)
        keep = {(calls.tracking["ResourceId"], calls.tracking["PolicyName"])}
        step, alarm = calls.step, calls.alarm
        if step is not None and alarm is not None:
            policy_arn = _call(self._aas, "put_scaling_policy", **step)["PolicyARN"]
            keep.add((step["ResourceId"], step["PolicyName"]))
            _call(self._cw, "put_metric_alarm", **alarm, AlarmActions=[policy_arn])
        else:
            self._delete_alarm(plan.name)
        for policy in self._policies(plan.name):
            if (policy["ResourceId"], policy["PolicyName"]) not in keep:
                self._delete_policy(policy)
        own_target = resource_id(plan.name, plan.variant)
        for target in self._targets(plan.name):
            if target["ResourceId"] != own_target:
                self._deregister(target["ResourceId"])
        logger.info("autoscaling of %s: %d..%d instances", plan.name, plan.scaling.min_instances,
                    plan.scaling.max_instances)

    def remove_scaling(self, name: str) -> None:
        """Delete the scale-from-zero alarm, every scaling policy and scalable target of endpoint `name`
        (any variant). Also needed before an update that changes the instance type."""
        self._delete_alarm(name)
        for policy in self._policies(name):
            self._delete_policy(policy)
        for target in self._targets(name):
            self._deregister(target["ResourceId"])

    def _policies(self, name: str) -> list[dict[str, Any]]:
        # The listing is per namespace (a ResourceId filter needs the variant, which delete does not know).
        prefix = resource_id(name, "")
        policies = _paginate(self._aas, "describe_scaling_policies", "ScalingPolicies", ServiceNamespace=NAMESPACE)
        return [p for p in policies if p["ResourceId"].startswith(prefix) and p["ScalableDimension"] == DIMENSION]

    def _targets(self, name: str) -> list[dict[str, Any]]:
        prefix = resource_id(name, "")
        targets = _paginate(self._aas, "describe_scalable_targets", "ScalableTargets", ServiceNamespace=NAMESPACE)
        return [t for t in targets if t["ResourceId"].startswith(prefix) and t["ScalableDimension"] == DIMENSION]

    def _delete_policy(self, policy: dict[str, Any]) -> None:
        _ignore_missing(self._aas, "delete_scaling_policy", PolicyName=policy["PolicyName"],
                        ServiceNamespace=NAMESPACE, ResourceId=policy["ResourceId"], ScalableDimension=DIMENSION)

    def _deregister(self, resource: str) -> None:
        _ignore_missing(self._aas, "deregister_scalable_target", ServiceNamespace=NAMESPACE, ResourceId=resource,
                        ScalableDimension=DIMENSION)

    def _delete_alarm(self, name: str) -> None:
        alarm = from_zero_alarm_name(name)
        if _call(self._cw, "describe_alarms", AlarmNames=[alarm]).get("MetricAlarms"):
            _ignore_missing(self._cw, "delete_alarms", AlarmNames=[alarm])


# -- calls ---------------------------------------------------------------------------------------------


def _operation(client: Any, operation: str) -> str:
    return f"{client.meta.service_model.service_name}.{operation}"


@contextmanager
def _translated(client: Any, operation: str) -> Iterator[None]:
    """Turn any botocore failure inside the block into a `CloudError` naming the call."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise CloudError(_operation(client, operation), str(error.get("Code") or "Unknown"),
                         str(error.get("Message") or exc)) from exc
    except BotoCoreError as exc:
        raise CloudError(_operation(client, operation), type(exc).__name__, str(exc)) from exc


def _call(client: Any, operation: str, **arguments: Any) -> dict[str, Any]:
    """One API call; any botocore failure becomes a `CloudError` naming the call."""
    with _translated(client, operation):
        return getattr(client, operation)(**arguments)


def _ignore_missing(client: Any, operation: str, **arguments: Any) -> None:
    try:
        _call(client, operation, **arguments)
    except CloudError as exc:
        if not exc.is_missing:
            raise


def _paginate(client: Any, operation: str, key: str, **arguments: Any) -> list[dict[str, Any]]:
    """Every item of a paginated listing (collected, so a failure on page 3 is one `CloudError`)."""
    with _translated(client, operation):
        return [item for page in client.get_paginator(operation).paginate(**arguments) for item in page.get(key, [])]
