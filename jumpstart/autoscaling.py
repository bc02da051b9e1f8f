"""Autoscaling of an endpoint's variant with Application Auto Scaling.

``txt2img deploy --min-instances N --max-instances M`` registers the variant as a scalable target
(``sagemaker:variant:DesiredInstanceCount`` of ``endpoint/NAME/variant/VARIANT``) and attaches one
target-tracking policy:

* real-time endpoints track ``SageMakerVariantInvocationsPerInstance`` (invocations per instance
  per minute), the metric AWS's own SageMaker autoscaling guide uses;
* async endpoints track ``ApproximateBacklogSizePerInstance`` (queued requests per instance),
  because their invocations are queued, not answered while the caller waits. An async endpoint
  may scale to 0 instances; a target-tracking policy cannot wake it from 0 (there is no instance
  to divide by), so a step-scaling policy on a CloudWatch alarm on ``HasBacklogWithoutCapacity``
  adds the first instance when a request arrives, as AWS's async-inference guide does.

Real-time variants need at least 1 instance (SageMaker scales to 0 only async endpoints and
inference components, which txt2img does not create).
"""

from __future__ import annotations

from dataclasses import dataclass

from jumpstart.errors import AwsContext, SageMakerError, aws_errors, explain_client_error

NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
# One SD image takes ~5-10 s on a g4dn/g5, so one instance answers ~6-12 requests a minute; 5 a
# minute keeps each instance about half busy before another starts (they take minutes to start).
DEFAULT_TARGET_INVOCATIONS = 5.0
# Async: queued requests per instance; two keep an instance busy while the next one starts.
DEFAULT_TARGET_BACKLOG = 2.0
# Out quickly (a new instance is minutes away anyway), in slowly (do not drop capacity on a lull).
SCALE_OUT_COOLDOWN_SECONDS = 60
SCALE_IN_COOLDOWN_SECONDS = 300


@dataclass(frozen=True)
class Scaling:
    """The instance range and the per-instance load target of an autoscaled endpoint."""

    min_instances: int
    max_instances: int
    target: float  # invocations per instance per minute, or queued requests per instance (async)
    is_async: bool = False

    def __post_init__(self) -> None:
        lowest = 0 if self.is_async else 1
        if self.min_instances < lowest:
            why = "" if self.is_async else " (only --async endpoints can scale to 0 instances)"
            raise SageMakerError(f"--min-instances must be at least {lowest}{why}, got {self.min_instances}")
        if self.max_instances < max(self.min_instances, 1):
            raise SageMakerError(
                f"need --max-instances >= --min-instances and >= 1, got {self.min_instances}..{self.max_instances}"
            )
        if self.target <= 0:
            raise SageMakerError(f"--target-invocations must be positive, got {self.target}")

    @property
    def initial_instances(self) -> int:
        """SageMaker starts a variant with at least one instance; an async one may scale to 0 after."""
        return max(self.min_instances, 1)


def resource_id(endpoint: str, variant: str) -> str:
    return f"endpoint/{endpoint}/variant/{variant}"


def policy_name(endpoint: str) -> str:
    return f"{endpoint}-target-tracking"


def wake_up_names(endpoint: str) -> str:
    """The name of both the step-scaling policy and the alarm that wake an async endpoint from 0."""
    return f"{endpoint}-scale-from-zero"


def _target_tracking(endpoint: str, variant: str, scaling: Scaling) -> dict:
    configuration: dict = {
        "TargetValue": scaling.target,
        "ScaleOutCooldown": SCALE_OUT_COOLDOWN_SECONDS,
        "ScaleInCooldown": SCALE_IN_COOLDOWN_SECONDS,
    }
    if scaling.is_async:
        configuration["CustomizedMetricSpecification"] = {
            "MetricName": "ApproximateBacklogSizePerInstance",
            "Namespace": "AWS/SageMaker",
            "Dimensions": [{"Name": "EndpointName", "Value": endpoint}],
            "Statistic": "Average",
        }
    else:
        configuration["PredefinedMetricSpecification"] = {
            "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
        }
    return {
        "PolicyName": policy_name(endpoint),
        "ServiceNamespace": NAMESPACE,
        "ResourceId": resource_id(endpoint, variant),
        "ScalableDimension": DIMENSION,
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": configuration,
    }


def register_autoscaling(context: AwsContext, endpoint: str, variant: str, scaling: Scaling) -> None:
    """Register the InService variant and attach its policies (SageMaker refuses a Creating one)."""
    autoscaling = context.client("application-autoscaling")
    target = resource_id(endpoint, variant)
    with aws_errors(f"registering {target} for autoscaling"):
        autoscaling.register_scalable_target(
            ServiceNamespace=NAMESPACE,
            ResourceId=target,
            ScalableDimension=DIMENSION,
            MinCapacity=scaling.min_instances,
            MaxCapacity=scaling.max_instances,
        )
    with aws_errors(f"attaching the scaling policy of {endpoint}"):
        autoscaling.put_scaling_policy(**_target_tracking(endpoint, variant, scaling))
    if scaling.min_instances == 0:
        _add_wake_up(context, autoscaling, endpoint, target)


def _add_wake_up(context: AwsContext, autoscaling, endpoint: str, target: str) -> None:
    name = wake_up_names(endpoint)
    with aws_errors(f"attaching the scale-from-zero policy of {endpoint}"):
        policy = autoscaling.put_scaling_policy(
            PolicyName=name,
            ServiceNamespace=NAMESPACE,
            ResourceId=target,
            ScalableDimension=DIMENSION,
            PolicyType="StepScaling",
            StepScalingPolicyConfiguration={
                "AdjustmentType": "ChangeInCapacity",
                "MetricAggregationType": "Average",
                "Cooldown": SCALE_OUT_COOLDOWN_SECONDS,
                "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}],
            },
        )
    with aws_errors(f"creating the alarm {name}"):
        context.client("cloudwatch").put_metric_alarm(
            AlarmName=name,
            MetricName="HasBacklogWithoutCapacity",
            Namespace="AWS/SageMaker",
            Dimensions=[{"Name": "EndpointName", "Value": endpoint}],
            Statistic="Average",
            Period=60,
            EvaluationPeriods=2,
            DatapointsToAlarm=2,
            Threshold=1,
            ComparisonOperator="GreaterThanOrEqualToThreshold",
            TreatMissingData="missing",
            AlarmActions=[policy["PolicyARN"]],
        )


def remove_autoscaling(context: AwsContext, endpoint: str, variants: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Delete the variants' scaling policies and scalable targets, and the wake-up alarm of an async
    endpoint; returns the resource ids deregistered and the problems met, instead of raising, like
    ``deploy.remove_resources``."""
    from botocore.exceptions import ClientError

    autoscaling = context.client("application-autoscaling")
    removed, problems = [], []
    for variant in variants:
        target = resource_id(endpoint, variant)
        try:
            registered = autoscaling.describe_scalable_targets(
                ServiceNamespace=NAMESPACE, ResourceIds=[target], ScalableDimension=DIMENSION
            )["ScalableTargets"]
            if not registered:
                continue
            policies = autoscaling.describe_scaling_policies(
                ServiceNamespace=NAMESPACE, ResourceId=target, ScalableDimension=DIMENSION
            )["ScalingPolicies"]
            for policy in policies:
                autoscaling.delete_scaling_policy(
                    PolicyName=policy["PolicyName"],
                    ServiceNamespace=NAMESPACE,
                    ResourceId=target,
                    ScalableDimension=DIMENSION,
                )
                if policy["PolicyName"] == wake_up_names(endpoint):
                    context.client("cloudwatch").delete_alarms(AlarmNames=[wake_up_names(endpoint)])
            autoscaling.deregister_scalable_target(
                ServiceNamespace=NAMESPACE, ResourceId=target, ScalableDimension=DIMENSION
            )
            removed.append(target)
        except ClientError as error:
            problems.append(explain_client_error(error, f"removing the autoscaling of {target}"))
    return removed, problems


def scaling_ranges(context: AwsContext) -> dict[str, tuple[int, int]]:
    """``endpoint/NAME/variant/VARIANT`` -> (min, max) for every registered SageMaker variant."""
    autoscaling = context.client("application-autoscaling")
    found = {}
    with aws_errors(f"listing autoscaled endpoints in {context.region}"):
        for page in autoscaling.get_paginator("describe_scalable_targets").paginate(ServiceNamespace=NAMESPACE):
            for target in page["ScalableTargets"]:
                if target["ScalableDimension"] == DIMENSION:
                    found[target["ResourceId"]] = (target["MinCapacity"], target["MaxCapacity"])
    return found
