"""SageMakerControl against moto: what create sends (read back from SageMaker), autoscaling for async and
real-time endpoints, idempotent delete and re-apply, describe/list, rollback of a failed create, and the
plan checks that stop bad options before any call."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from botocore.exceptions import ClientError

from deploy.sagemaker.control import (
    CloudError,
    EndpointPlan,
    PlanError,
    SageMakerControl,
    ScalingPlan,
    plan_arguments,
    scaling_arguments,
)
from tests.aws.conftest import IMAGE_URI, ROLE_ARN

OUTPUT = "s3://studio-results/async/out/"
FAILURES = "s3://studio-results/async/failed/"
SUCCESS_TOPIC = "arn:aws:sns:us-east-1:123456789012:studio-done"
ERROR_TOPIC = "arn:aws:sns:us-east-1:123456789012:studio-failed"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"


def realtime_plan(name: str, **changes: Any) -> EndpointPlan:
    values: dict[str, Any] = {
        "name": name, "endpoint_type": "realtime", "image_uri": IMAGE_URI, "role_arn": ROLE_ARN,
        "environment": {"STUDIO_MODE": "sagemaker", "HF_HUB_OFFLINE": "1"}, "tags": {"team": "art"},
    }
    values.update(changes)
    return EndpointPlan(**values)


def async_plan(name: str, **changes: Any) -> EndpointPlan:
    values: dict[str, Any] = {
        "endpoint_type": "async", "output_path": OUTPUT, "failure_path": FAILURES,
        "success_topic": SUCCESS_TOPIC, "error_topic": ERROR_TOPIC,
        "scaling": ScalingPlan(min_instances=0, max_instances=3),
    }
    values.update(changes)
    return realtime_plan(name, **values)


def tags_of(sm: Any, arn: str) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in sm.list_tags(ResourceArn=arn)["Tags"]}


def policies_of(aas: Any, name: str, variant: str = "AllTraffic") -> dict[str, dict[str, Any]]:
    answer = aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=f"endpoint/{name}/variant/{variant}")
    return {policy["PolicyName"]: policy for policy in answer["ScalingPolicies"]
            if policy["ResourceId"] == f"endpoint/{name}/variant/{variant}"}


def targets_of(aas: Any, name: str) -> list[dict[str, Any]]:
    answer = aas.describe_scalable_targets(ServiceNamespace="sagemaker")
    return [t for t in answer["ScalableTargets"] if t["ResourceId"].startswith(f"endpoint/{name}/")]


def alarms_of(cw: Any, name: str) -> list[dict[str, Any]]:
    return cw.describe_alarms(AlarmNamePrefix=name)["MetricAlarms"]


def missing(call: Any, **arguments: Any) -> bool:
    try:
        call(**arguments)
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "ValidationException", exc
        return True
    return False


# -- create ----------------------------------------------------------------------------------------------


def test_create_realtime_sends_model_config_and_endpoint(control: SageMakerControl, sm: Any, endpoint_name: str) -> None:
    plan = realtime_plan(endpoint_name, instance_type="ml.g5.2xlarge", initial_instances=1)
    arn = control.create(plan)

    endpoint = sm.describe_endpoint(EndpointName=endpoint_name)
    assert endpoint["EndpointArn"] == arn
    assert endpoint["EndpointConfigName"] == endpoint_name
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint_name)
    assert "AsyncInferenceConfig" not in config
    [variant] = config["ProductionVariants"]
    assert variant["VariantName"] == "AllTraffic"
    assert variant["ModelName"] == endpoint_name
    assert variant["InstanceType"] == "ml.g5.2xlarge"
    assert variant["InitialInstanceCount"] == 1
    assert variant["ModelDataDownloadTimeoutInSeconds"] == 1200
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 3600
    model = sm.describe_model(ModelName=endpoint_name)
    assert model["ExecutionRoleArn"] == ROLE_ARN
    assert model["PrimaryContainer"]["Image"] == IMAGE_URI
    assert model["PrimaryContainer"]["Environment"] == {"STUDIO_MODE": "sagemaker", "HF_HUB_OFFLINE": "1"}

    expected_tags = {"team": "art", "studio:managed": "true", "studio:endpoint": endpoint_name}
    for resource_arn in (arn, config["EndpointConfigArn"], model["ModelArn"]):
        assert tags_of(sm, resource_arn) == expected_tags


def test_create_async_sends_its_inference_config(control: SageMakerControl, sm: Any, endpoint_name: str) -> None:
    plan = async_plan(endpoint_name, variant="prod", model_data_download_timeout=600, startup_health_check_timeout=900)
    control.create(plan)

    config = sm.describe_endpoint_config(EndpointConfigName=endpoint_name)
    assert config["AsyncInferenceConfig"] == {
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 1},
        "OutputConfig": {"S3OutputPath": OUTPUT, "S3FailurePath": FAILURES,
                         "NotificationConfig": {"SuccessTopic": SUCCESS_TOPIC, "ErrorTopic": ERROR_TOPIC}},
    }
    [variant] = config["ProductionVariants"]
    assert (variant["VariantName"], variant["ModelDataDownloadTimeoutInSeconds"],
            variant["ContainerStartupHealthCheckTimeoutInSeconds"]) == ("prod", 600, 900)
    found = control.describe(endpoint_name)
    assert found is not None and found.endpoint_type == "async" and found.managed


def test_plan_arguments_are_exact() -> None:
    plan = async_plan("sd-async", failure_path=None, success_topic=None, error_topic=None,
                      max_concurrent_invocations=2, tags={})
    arguments = plan_arguments(plan)
    tags = [{"Key": "studio:managed", "Value": "true"}, {"Key": "studio:endpoint", "Value": "sd-async"}]
    assert arguments["create_model"] == {
        "ModelName": "sd-async", "ExecutionRoleArn": ROLE_ARN, "Tags": tags,
        "PrimaryContainer": {"Image": IMAGE_URI, "Mode": "SingleModel",
                             "Environment": {"STUDIO_MODE": "sagemaker", "HF_HUB_OFFLINE": "1"}},
    }
    assert arguments["create_endpoint_config"]["AsyncInferenceConfig"] == {
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 2}, "OutputConfig": {"S3OutputPath": OUTPUT}}
    assert arguments["create_endpoint"] == {"EndpointName": "sd-async", "EndpointConfigName": "sd-async", "Tags": tags}
    realtime = plan_arguments(realtime_plan("sd-rt", output_path=OUTPUT))
    assert "AsyncInferenceConfig" not in realtime["create_endpoint_config"]


def test_scaling_arguments_are_exact() -> None:
    realtime = scaling_arguments(realtime_plan("sd-rt", initial_instances=2, scaling=ScalingPlan(max_instances=3)))
    assert realtime is not None and realtime.step is None and realtime.alarm is None
    assert realtime.register == {"ServiceNamespace": "sagemaker", "ResourceId": "endpoint/sd-rt/variant/AllTraffic",
                                 "ScalableDimension": DIMENSION, "MinCapacity": 1, "MaxCapacity": 3}
    asynchronous = scaling_arguments(async_plan("sd-async"))
    assert asynchronous is not None and asynchronous.step is not None and asynchronous.alarm is not None
    assert asynchronous.register["MinCapacity"] == 0
    assert asynchronous.step["PolicyName"] == asynchronous.alarm["AlarmName"] == "sd-async-backlog-without-capacity"
    assert "AlarmActions" not in asynchronous.alarm  # the step policy's ARN, filled in by apply_scaling


def test_a_failed_endpoint_config_leaves_no_model(strict_control: SageMakerControl, sm: Any, endpoint_name: str) -> None:
    # Without the g5 patch moto rejects the instance type in create_endpoint_config, after create_model.
    with pytest.raises(CloudError) as caught:
        strict_control.create(realtime_plan(endpoint_name, instance_type="ml.g5.2xlarge"))
    assert caught.value.operation == "sagemaker.create_endpoint_config"
    assert caught.value.code == "ValidationException" and "ml.g5.2xlarge" in str(caught.value)
    assert missing(sm.describe_model, ModelName=endpoint_name)
    assert missing(sm.describe_endpoint_config, EndpointConfigName=endpoint_name)


def test_a_failed_endpoint_leaves_no_model_or_config(
    control: SageMakerControl, sm: Any, endpoint_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(**arguments: Any) -> None:
        error = {"Error": {"Code": "ResourceLimitExceeded", "Message": "account quota of ml.g5.2xlarge reached"}}
        raise ClientError(error, "CreateEndpoint")

    monkeypatch.setattr(control._sm, "create_endpoint", refuse)
    with pytest.raises(CloudError, match="sagemaker.create_endpoint failed: ResourceLimitExceeded: account quota"):
        control.create(async_plan(endpoint_name))
    assert missing(sm.describe_model, ModelName=endpoint_name)
    assert missing(sm.describe_endpoint_config, EndpointConfigName=endpoint_name)
    assert control.describe(endpoint_name) is None


# -- autoscaling -------------------------------------------------------------------------------------------


def test_async_scaling_scales_from_zero(control: SageMakerControl, aas: Any, cw: Any, endpoint_name: str) -> None:
    plan = async_plan(endpoint_name)
    control.create(plan)
    control.apply_scaling(plan)

    [target] = targets_of(aas, endpoint_name)
    assert (target["ResourceId"], target["ScalableDimension"]) == (f"endpoint/{endpoint_name}/variant/AllTraffic", DIMENSION)
    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, 3)

    policies = policies_of(aas, endpoint_name)
    assert set(policies) == {f"{endpoint_name}-backlog-per-instance", f"{endpoint_name}-backlog-without-capacity"}
    tracking = policies[f"{endpoint_name}-backlog-per-instance"]
    assert tracking["PolicyType"] == "TargetTrackingScaling"
    assert tracking["TargetTrackingScalingPolicyConfiguration"] == {
        "TargetValue": 3.0,
        "CustomizedMetricSpecification": {
            "MetricName": "ApproximateBacklogSizePerInstance", "Namespace": "AWS/SageMaker",
            "Dimensions": [{"Name": "EndpointName", "Value": endpoint_name}], "Statistic": "Average"},
        "ScaleInCooldown": 180, "ScaleOutCooldown": 60,
    }
    step = policies[f"{endpoint_name}-backlog-without-capacity"]
    assert step["PolicyType"] == "StepScaling"
    assert step["StepScalingPolicyConfiguration"] == {
        "AdjustmentType": "ChangeInCapacity", "MetricAggregationType": "Average", "Cooldown": 180,
        "StepAdjustments": [{"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}],
    }

    [alarm] = alarms_of(cw, endpoint_name)
    assert alarm["AlarmActions"] == [step["PolicyARN"]]
    assert (alarm["Namespace"], alarm["MetricName"], alarm["Statistic"]) == (
        "AWS/SageMaker", "HasBacklogWithoutCapacity", "Average")
    assert alarm["Dimensions"] == [{"Name": "EndpointName", "Value": endpoint_name}]
    assert (alarm["ComparisonOperator"], alarm["Threshold"], alarm["Period"], alarm["EvaluationPeriods"],
            alarm["DatapointsToAlarm"], alarm["TreatMissingData"]) == (
        "GreaterThanOrEqualToThreshold", 1.0, 60, 1, 1, "missing")


def test_realtime_scaling_tracks_invocations(control: SageMakerControl, aas: Any, cw: Any, endpoint_name: str) -> None:
    plan = realtime_plan(endpoint_name, scaling=ScalingPlan(min_instances=1, max_instances=4, scale_in_cooldown=300))
    control.create(plan)
    control.apply_scaling(plan)

    [target] = targets_of(aas, endpoint_name)
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 4)
    [(name, policy)] = policies_of(aas, endpoint_name).items()
    assert name == f"{endpoint_name}-invocations-per-instance"
    assert policy["TargetTrackingScalingPolicyConfiguration"] == {
        "TargetValue": 5.0,
        "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
        "ScaleInCooldown": 300, "ScaleOutCooldown": 60,
    }
    assert alarms_of(cw, endpoint_name) == []


def test_reapplying_scaling_converges(control: SageMakerControl, aas: Any, cw: Any, endpoint_name: str) -> None:
    plan = async_plan(endpoint_name)
    control.create(plan)
    control.apply_scaling(plan)
    control.apply_scaling(plan)
    assert len(targets_of(aas, endpoint_name)) == 1
    assert len(policies_of(aas, endpoint_name)) == 2
    assert len(alarms_of(cw, endpoint_name)) == 1

    changed = dataclasses.replace(plan, scaling=ScalingPlan(min_instances=1, max_instances=5, target_value=2))
    control.apply_scaling(changed)
    [target] = targets_of(aas, endpoint_name)
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 5)
    tracking = policies_of(aas, endpoint_name)[f"{endpoint_name}-backlog-per-instance"]
    assert tracking["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 2.0
    [alarm] = alarms_of(cw, endpoint_name)
    assert alarm["AlarmActions"] == [policies_of(aas, endpoint_name)[f"{endpoint_name}-backlog-without-capacity"]["PolicyARN"]]


def test_applying_scaling_removes_policies_the_plan_does_not_name(
    control: SageMakerControl, aas: Any, cw: Any, endpoint_name: str
) -> None:
    plan = realtime_plan(endpoint_name, scaling=ScalingPlan(max_instances=2))
    control.create(plan)
    stale = {"ServiceNamespace": "sagemaker", "ScalableDimension": DIMENSION}
    for variant in ("AllTraffic", "old"):
        aas.register_scalable_target(**stale, ResourceId=f"endpoint/{endpoint_name}/variant/{variant}",
                                     MinCapacity=1, MaxCapacity=9)
    aas.put_scaling_policy(**stale, ResourceId=f"endpoint/{endpoint_name}/variant/AllTraffic", PolicyName="old-cpu",
                           PolicyType="TargetTrackingScaling", TargetTrackingScalingPolicyConfiguration={
                               "TargetValue": 50.0,
                               "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}})

    control.apply_scaling(plan)
    assert set(policies_of(aas, endpoint_name)) == {f"{endpoint_name}-invocations-per-instance"}
    [target] = targets_of(aas, endpoint_name)
    assert (target["ResourceId"], target["MaxCapacity"]) == (f"endpoint/{endpoint_name}/variant/AllTraffic", 2)


def test_disabled_scaling_removes_policies_alarm_and_target(
    control: SageMakerControl, aas: Any, cw: Any, endpoint_name: str
) -> None:
    plan = async_plan(endpoint_name)
    control.create(plan)
    control.apply_scaling(plan)
    disabled = dataclasses.replace(plan, scaling=ScalingPlan(enabled=False))
    assert scaling_arguments(disabled) is None
    control.apply_scaling(disabled)
    assert policies_of(aas, endpoint_name) == {}
    assert targets_of(aas, endpoint_name) == []
    assert alarms_of(cw, endpoint_name) == []
    control.apply_scaling(disabled)  # nothing left to remove: quiet


def test_set_instances_updates_the_variant(control: SageMakerControl, endpoint_name: str) -> None:
    control.create(async_plan(endpoint_name, scaling=ScalingPlan(enabled=False)))
    control.set_instances(endpoint_name, "AllTraffic", 0)
    found = control.describe(endpoint_name)
    assert found is not None and found.desired_instances == 0
    with pytest.raises(CloudError, match="update_endpoint_weights_and_capacities failed: ValidationException"):
        control.set_instances(endpoint_name, "NoSuchVariant", 1)


# -- describe, list, delete --------------------------------------------------------------------------------


def test_describe_reports_the_endpoint(control: SageMakerControl, endpoint_name: str) -> None:
    control.create(realtime_plan(endpoint_name, initial_instances=2, scaling=ScalingPlan(max_instances=2)))
    found = control.describe(endpoint_name)
    assert found is not None
    assert (found.name, found.status, found.failure_reason, found.endpoint_type) == (
        endpoint_name, "InService", None, "realtime")
    assert (found.current_instances, found.desired_instances, found.config_name, found.managed) == (
        2, 2, endpoint_name, True)
    assert found.created_at is not None and found.last_modified is not None
    assert control.describe(f"{endpoint_name}-gone") is None


def test_describe_shows_a_failure_verbatim(control: SageMakerControl, endpoint_name: str) -> None:
    from moto.sagemaker.models import sagemaker_backends

    control.create(realtime_plan(endpoint_name))
    fake = sagemaker_backends["123456789012"]["us-east-1"].endpoints[endpoint_name]
    fake.endpoint_status, fake.failure_reason = "Failed", "The primary container did not pass the ping health check."
    found = control.describe(endpoint_name)
    assert found is not None
    assert (found.status, found.failure_reason) == ("Failed", "The primary container did not pass the ping health check.")


def test_list_marks_endpoints_the_studio_did_not_create(
    control: SageMakerControl, sm: Any, endpoint_name: str
) -> None:
    control.create(async_plan(endpoint_name))
    foreign = f"{endpoint_name}-foreign"
    sm.create_model(ModelName=foreign, ExecutionRoleArn=ROLE_ARN, PrimaryContainer={"Image": IMAGE_URI})
    sm.create_endpoint_config(EndpointConfigName=foreign, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": foreign, "InstanceType": "ml.m5.large", "InitialInstanceCount": 1}])
    sm.create_endpoint(EndpointName=foreign, EndpointConfigName=foreign)

    listed = {endpoint.name: endpoint for endpoint in control.list_endpoints()}
    assert (listed[endpoint_name].managed, listed[endpoint_name].endpoint_type) == (True, "async")
    assert (listed[foreign].managed, listed[foreign].endpoint_type) == (False, "realtime")
    assert listed[foreign].current_instances == 1


def test_delete_removes_everything_and_repeats_quietly(
    control: SageMakerControl, sm: Any, aas: Any, cw: Any, endpoint_name: str
) -> None:
    plan = async_plan(endpoint_name)
    control.create(plan)
    control.apply_scaling(plan)
    neighbour = f"{endpoint_name}-2"  # a name sharing the prefix must survive
    control.create(async_plan(neighbour))
    control.apply_scaling(async_plan(neighbour))

    control.delete(endpoint_name)
    assert control.describe(endpoint_name) is None
    assert missing(sm.describe_endpoint_config, EndpointConfigName=endpoint_name)
    assert missing(sm.describe_model, ModelName=endpoint_name)
    assert policies_of(aas, endpoint_name) == {}
    assert targets_of(aas, endpoint_name) == []
    assert cw.describe_alarms(AlarmNames=[f"{endpoint_name}-backlog-without-capacity"])["MetricAlarms"] == []
    control.delete(endpoint_name)  # second delete: nothing to do, no error

    assert control.describe(neighbour) is not None
    assert len(policies_of(aas, neighbour)) == 2
    assert len(alarms_of(cw, neighbour)) == 1


# -- plan checks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "sd_turbo"}, "options.name"),
        ({"name": "a" * 64}, "options.name"),
        ({"name": "-leading"}, "options.name"),
        ({"endpoint_type": "serverless"}, "options.endpoint_type"),
        ({"role_arn": "studio-role"}, "options.role_arn"),
        ({"instance_type": "g5.2xlarge"}, "options.instance_type"),
        ({"initial_instances": 0}, "options.initial_instances"),
        ({"environment": {f"K{i}": "v" for i in range(101)}}, "options.environment"),
        ({"environment": {"LONG": "x" * 1025}}, "options.environment"),
        ({"environment": {"BAD-NAME": "1"}}, "options.environment"),
        ({"variant": "all traffic"}, "options.variant"),
        ({"model_data_download_timeout": 30}, "options.model_data_download_timeout"),
        ({"tags": {"studio:managed": "false"}}, "options.tags"),
        ({"scaling": ScalingPlan(min_instances=0, max_instances=2)}, "options.scaling.min_instances"),
        ({"scaling": ScalingPlan(min_instances=3, max_instances=2)}, "options.scaling.max_instances"),
        ({"scaling": ScalingPlan(target_value=0)}, "options.scaling.target_value"),
        ({"scaling": ScalingPlan(target_value=float("nan"))}, "options.scaling.target_value"),
        ({"initial_instances": 2}, "options.initial_instances"),  # above the default max of 1
    ],
)
def test_realtime_plan_errors_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(PlanError) as caught:
        realtime_plan(**{"name": "sd-endpoint", **changes})
    assert caught.value.field == field
    assert field.removeprefix("options.") in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"output_path": None}, "options.output_path"),
        ({"output_path": "https://example.com/out"}, "options.output_path"),
        ({"failure_path": "studio-results/failed"}, "options.failure_path"),
        ({"success_topic": "studio-done"}, "options.success_topic"),
        ({"max_concurrent_invocations": 0}, "options.max_concurrent_invocations"),
        ({"scaling": ScalingPlan(min_instances=-1, max_instances=2)}, "options.scaling.min_instances"),
        ({"scaling": ScalingPlan(min_instances=0, max_instances=0)}, "options.scaling.max_instances"),
    ],
)
def test_async_plan_errors_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(PlanError) as caught:
        async_plan(**{"name": "sd-endpoint", **changes})
    assert caught.value.field == field


def test_async_may_scale_to_zero_and_disabled_scaling_skips_its_checks() -> None:
    assert async_plan("sd-endpoint").scaling.min_instances == 0
    realtime_plan("sd-endpoint", initial_instances=3, scaling=ScalingPlan(enabled=False, min_instances=0))


def test_the_plan_keeps_its_own_copy_of_the_environment() -> None:
    environment = {"STUDIO_MODE": "sagemaker"}
    plan = realtime_plan("sd-endpoint", environment=environment)
    environment["STUDIO_MODE"] = "changed"
    assert plan_arguments(plan)["create_model"]["PrimaryContainer"]["Environment"] == {"STUDIO_MODE": "sagemaker"}
