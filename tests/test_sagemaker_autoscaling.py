"""txt2img deploy --min-instances/--max-instances: the Application Auto Scaling requests, their
removal by `endpoints delete` and by a failed deploy, and the counts `endpoints list` shows."""

from __future__ import annotations

import json

import pytest
from aws_fixtures import FIXTURE_MODEL, ROLE

from jumpstart.autoscaling import DEFAULT_TARGET_INVOCATIONS, SCALE_IN_COOLDOWN_SECONDS, SCALE_OUT_COOLDOWN_SECONDS
from jumpstart.errors import SageMakerError
from txt2img.cli import main

# No test here may leave the machine.
pytestmark = pytest.mark.usefixtures("no_network")

DIMENSION = "sagemaker:variant:DesiredInstanceCount"


def _sent(sent_requests, operation: str) -> list[dict]:
    return [params for name, params in sent_requests if name == operation]


def _deploy(*options: str) -> None:
    main(["deploy", FIXTURE_MODEL, "--role", ROLE, *options])


def _autoscaling_state(session) -> tuple[list, list]:
    client = session.client("application-autoscaling")
    return (
        client.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"],
        client.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"],
    )


def test_deploy_registers_the_variant_and_a_target_tracking_policy(aws, sent_requests, capsys):
    _deploy("--endpoint-name", "art", "--min-instances", "2", "--max-instances", "5", "--target-invocations", "8")

    (variant,) = _sent(sent_requests, "CreateEndpointConfig")[0]["ProductionVariants"]
    assert variant["InitialInstanceCount"] == 2  # the endpoint starts at --min-instances
    (register,) = _sent(sent_requests, "RegisterScalableTarget")
    assert register == {
        "ServiceNamespace": "sagemaker",
        "ResourceId": "endpoint/art/variant/AllTraffic",
        "ScalableDimension": DIMENSION,
        "MinCapacity": 2,
        "MaxCapacity": 5,
    }
    (policy,) = _sent(sent_requests, "PutScalingPolicy")
    assert policy == {
        "PolicyName": "art-target-tracking",
        "ServiceNamespace": "sagemaker",
        "ResourceId": "endpoint/art/variant/AllTraffic",
        "ScalableDimension": DIMENSION,
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": 8.0,
            "ScaleOutCooldown": SCALE_OUT_COOLDOWN_SECONDS,
            "ScaleInCooldown": SCALE_IN_COOLDOWN_SECONDS,
            "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
        },
    }
    # Registered only once the endpoint is InService: SageMaker refuses a Creating variant.
    operations = [name for name, _ in sent_requests]
    assert operations.index("RegisterScalableTarget") > operations.index("CreateEndpoint")
    targets, policies = _autoscaling_state(aws)
    assert [(t["ResourceId"], t["MinCapacity"], t["MaxCapacity"]) for t in targets] == [
        ("endpoint/art/variant/AllTraffic", 2, 5)
    ]
    assert [p["PolicyName"] for p in policies] == ["art-target-tracking"]
    assert "autoscaling: 2-5 instances, target 8.0" in capsys.readouterr().out


def test_default_target_is_documented_value(aws, sent_requests):
    _deploy("--endpoint-name", "art", "--min-instances", "1", "--max-instances", "3")

    (policy,) = _sent(sent_requests, "PutScalingPolicy")
    assert policy["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == DEFAULT_TARGET_INVOCATIONS == 5.0


def test_async_endpoint_scales_to_zero_on_its_backlog_and_wakes_up_on_an_alarm(aws, sent_requests):
    main(
        ["deploy", "tiny-sd", "--role", ROLE, "--endpoint-name", "lazy", "--async", "--output", "s3://out/tiny"]
        + ["--min-instances", "0", "--max-instances", "2"]
    )

    (variant,) = _sent(sent_requests, "CreateEndpointConfig")[0]["ProductionVariants"]
    assert variant["InitialInstanceCount"] == 1  # SageMaker starts with one; scaling takes it to 0
    assert _sent(sent_requests, "RegisterScalableTarget")[0]["MinCapacity"] == 0
    tracking, step = _sent(sent_requests, "PutScalingPolicy")
    assert tracking["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 2.0
    assert tracking["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"] == {
        "MetricName": "ApproximateBacklogSizePerInstance",
        "Namespace": "AWS/SageMaker",
        "Dimensions": [{"Name": "EndpointName", "Value": "lazy"}],
        "Statistic": "Average",
    }
    assert (step["PolicyName"], step["PolicyType"]) == ("lazy-scale-from-zero", "StepScaling")
    (alarm,) = aws.client("cloudwatch").describe_alarms(AlarmNames=["lazy-scale-from-zero"])["MetricAlarms"]
    assert alarm["MetricName"] == "HasBacklogWithoutCapacity"
    assert alarm["Dimensions"] == [{"Name": "EndpointName", "Value": "lazy"}]
    assert len(alarm["AlarmActions"]) == 1 and "lazy-scale-from-zero" in alarm["AlarmActions"][0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--min-instances", "0", "--max-instances", "2"], "only --async endpoints can scale to 0"),
        (["--min-instances", "3", "--max-instances", "2"], "need --max-instances >= --min-instances"),
        (["--min-instances", "1"], "--min-instances and --max-instances go together"),
        (["--target-invocations", "3"], "--target-invocations needs --min-instances"),
        (["--min-instances", "1", "--max-instances", "2", "--target-invocations", "0"], "must be positive"),
        (["--min-instances", "1", "--max-instances", "2", "--no-wait"], "autoscaling needs --wait"),
    ],
)
def test_bad_scaling_options_are_refused_before_anything_is_created(aws, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        _deploy("--endpoint-name", "art", *options)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert aws.client("sagemaker").list_endpoints()["Endpoints"] == []


def test_failed_policy_removes_target_endpoint_config_and_model(aws, monkeypatch):
    from moto.applicationautoscaling.exceptions import AWSValidationException
    from moto.applicationautoscaling.models import ApplicationAutoscalingBackend

    from jumpstart.autoscaling import Scaling
    from jumpstart.deploy import deploy

    def refuse(self, *args, **kwargs):
        raise AWSValidationException("Only one target tracking policy per metric is allowed")

    monkeypatch.setattr(ApplicationAutoscalingBackend, "put_scaling_policy", refuse)
    with pytest.raises(SageMakerError, match="its endpoint, config and model were removed"):
        deploy(FIXTURE_MODEL, role=ROLE, endpoint_name="art", scaling=Scaling(1, 2, 5.0), poll_seconds=0)

    sagemaker = aws.client("sagemaker")
    assert sagemaker.list_endpoints()["Endpoints"] == []
    assert sagemaker.list_endpoint_configs()["EndpointConfigs"] == []
    assert sagemaker.list_models()["Models"] == []
    assert _autoscaling_state(aws) == ([], [])
    from jumpstart.records import recorded_endpoints

    assert recorded_endpoints() == []


def test_delete_removes_policy_and_target_before_the_endpoint(aws, sent_requests, capsys):
    main(
        ["deploy", "tiny-sd", "--role", ROLE, "--endpoint-name", "lazy", "--async", "--output", "s3://out/tiny"]
        + ["--min-instances", "0", "--max-instances", "2"]
    )
    _deploy("--endpoint-name", "keep", "--min-instances", "1", "--max-instances", "2")
    capsys.readouterr()
    sent_requests.clear()

    main(["endpoints", "delete", "lazy"])

    assert capsys.readouterr().out.splitlines() == [
        "deleted autoscaling of endpoint/lazy/variant/AllTraffic",
        "deleted endpoint lazy",
        "deleted endpoint config lazy",
        "deleted model lazy",
    ]
    operations = [name for name, _ in sent_requests]
    assert operations.index("DeleteScalingPolicy") < operations.index("DeregisterScalableTarget")
    assert operations.index("DeregisterScalableTarget") < operations.index("DeleteEndpoint")
    assert sorted(p["PolicyName"] for p in _sent(sent_requests, "DeleteScalingPolicy")) == [
        "lazy-scale-from-zero",
        "lazy-target-tracking",
    ]
    targets, policies = _autoscaling_state(aws)
    assert [t["ResourceId"] for t in targets] == ["endpoint/keep/variant/AllTraffic"]
    assert [p["PolicyName"] for p in policies] == ["keep-target-tracking"]
    assert aws.client("cloudwatch").describe_alarms(AlarmNames=["lazy-scale-from-zero"])["MetricAlarms"] == []


def test_list_shows_instance_counts_and_scaling_range(aws, capsys):
    _deploy("--endpoint-name", "scaled", "--min-instances", "2", "--max-instances", "4")
    _deploy("--endpoint-name", "fixed")
    capsys.readouterr()

    main(["endpoints", "list", "--json"])

    listed = {item["name"]: item for item in json.loads(capsys.readouterr().out)}
    assert (listed["scaled"]["current_instances"], listed["scaled"]["desired_instances"]) == (2, 2)
    assert listed["scaled"]["scaling"] == "2-4"
    assert (listed["fixed"]["current_instances"], listed["fixed"]["desired_instances"], listed["fixed"]["scaling"]) == (
        1,
        1,
        None,
    )
    main(["endpoints", "list"])
    table = capsys.readouterr().out
    assert "2-4" in table and "2/2" in table
