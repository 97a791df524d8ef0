"""What to ask SageMaker for: the inputs of ``sd-create-endpoint`` checked locally, and
the request bodies of every call it makes (``container/create_endpoint.py`` makes them).

Pure data, no AWS client: ``--dry-run`` prints :func:`plan`, and tests compare these
bodies with what moto stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from client.config import EXIT_USAGE, CliError

VARIANT = "AllTraffic"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")  # SageMaker's EndpointName pattern
ROLE_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
ECR_RE = re.compile(
    r"^\d{12}\.dkr\.ecr(-fips)?\.(?P<region>[a-z]{2}(-[a-z]+)+-\d+)\.amazonaws\.com(\.cn)?"
    r"/[a-z0-9]+(?:[._/-][a-z0-9]+)*(:\w[\w.-]{0,127}|@sha256:[0-9a-f]{64})?$"
)
S3_RE = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")
SNS_RE = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[\w.-]{1,256}$")
REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
INSTANCE_RE = re.compile(r"^ml\.[a-z0-9-]+\.[a-z0-9]+$")
ENV_KEY_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
RESERVED_ENV = {"MODEL_STORE": "--model-store", "OUTPUT": "--output", "ENDPOINT_NAME": "--name"}


@dataclass(frozen=True)
class Options:
    """Validated inputs; built by :func:`validate` only."""

    name: str
    image: str | None
    role: str | None
    model_store: str | None
    output: str | None
    region: str
    instance_type: str = "ml.g5.xlarge"
    sns_success: str | None = None
    sns_error: str | None = None
    max_concurrent: int = 1
    min_instances: int = 0
    max_instances: int = 2
    target_backlog: float = 2.0
    scale_in_cooldown: int = 600
    scale_out_cooldown: int = 600
    startup_timeout: int = 900
    env: dict[str, str] = field(default_factory=dict)
    update: bool = False
    scaling_only: bool = False
    wait: bool = True
    timeout: float = 3600.0


def ecr_region(image: str | None) -> str | None:
    """The region in an ECR image URI, or None."""
    match = ECR_RE.match(image or "")
    return match.group("region") if match else None


def validate(name: str, image: str | None, role: str | None, model_store: str | None, output: str | None,
             region: str | None, env: list[str] | None = None, **rest: Any) -> Options:
    """Check every input's shape locally; one usage error (exit 2) listing all problems."""
    problems: list[str] = []
    if not NAME_RE.match(name):
        problems.append(f"--name {name!r}: 1-63 letters, digits and hyphens, starting and ending with a letter or digit")
    deploying = not rest.get("scaling_only")
    if deploying:
        for flag, value, pattern, shape in (
            ("--image", image, ECR_RE, "an ECR image URI <account>.dkr.ecr.<region>.amazonaws.com/<repo>[:tag] (buildspec.yml writes it to image-uri.txt)"),
            ("--role", role, ROLE_RE, "an IAM role ARN arn:aws:iam::<account>:role/<name> SageMaker can assume"),
            ("--model-store", model_store, S3_RE, "s3://bucket/prefix/ (a local folder does not exist on the endpoint)"),
            ("--output", output, S3_RE, "s3://bucket/prefix/"),
        ):
            if not value or not pattern.match(value):
                problems.append(f"{flag} {repr(value) if value else 'is missing'}: expected {shape}")
    for flag in ("sns_success", "sns_error"):
        if rest.get(flag) and not SNS_RE.match(rest[flag]):
            problems.append(f"--{flag.replace('_', '-')} {rest[flag]!r}: expected an SNS topic ARN arn:aws:sns:<region>:<account>:<topic>")
    if "instance_type" in rest and not INSTANCE_RE.match(rest["instance_type"]):
        problems.append(f"--instance-type {rest['instance_type']!r}: expected a SageMaker type such as ml.g5.xlarge")
    lo, hi = rest.get("min_instances", 0), rest.get("max_instances", 2)
    if lo < 0 or hi < 1 or lo > hi:
        problems.append(f"--min-instances {lo} / --max-instances {hi}: need 0 <= min <= max and max >= 1")
    if not 1 <= rest.get("max_concurrent", 1) <= 1000:
        problems.append("--max-concurrent: 1 to 1000 invocations per instance")
    if rest.get("target_backlog", 2.0) <= 0:
        problems.append("--target-backlog: a backlog per instance above 0")
    if min(rest.get("scale_in_cooldown", 0), rest.get("scale_out_cooldown", 0)) < 0 or rest.get("timeout", 1) <= 0:
        problems.append("--scale-in-cooldown / --scale-out-cooldown / --timeout: seconds, not negative")
    if not 60 <= rest.get("startup_timeout", 900) <= 3600:
        problems.append("--startup-timeout: 60 to 3600 seconds (SageMaker's range)")
    extra: dict[str, str] = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not ENV_KEY_RE.match(key):
            problems.append(f"--env {item!r}: expected KEY=VALUE with KEY a valid variable name")
        elif key in RESERVED_ENV:
            problems.append(f"--env {key}: set it with {RESERVED_ENV[key]}")
        elif len(value) > 1024:
            problems.append(f"--env {key}: SageMaker takes values of at most 1024 characters")
        else:
            extra[key] = value
    region = region or ecr_region(image)
    if not region or not REGION_RE.match(region):
        problems.append(f"region {region!r}: pass --region (e.g. us-east-1) or set AWS_REGION" if region else "no AWS region: pass --region or set AWS_REGION")
    elif deploying and ecr_region(image) not in (None, region):
        problems.append(f"--image is in {ecr_region(image)}, the endpoint in {region}: SageMaker pulls only from ECR in its own region")
    if problems:
        raise CliError("invalid input, nothing was created:\n  " + "\n  ".join(problems), EXIT_USAGE)
    if output and not output.endswith("/"):
        output += "/"
    if model_store and not model_store.endswith("/"):
        model_store += "/"
    return Options(name=name, image=image, role=role, model_store=model_store, output=output, region=region, env=extra, **rest)


# ------------------------------------------------------------------ requests
def model_request(o: Options, model_name: str) -> dict:
    # REQUEST_TIMEOUT: an async invocation may run up to an hour; the server must not 504 first
    env = {"REQUEST_TIMEOUT": "3600", "AWS_REGION": o.region, **o.env,
           "MODEL_STORE": o.model_store, "OUTPUT": o.output, "ENDPOINT_NAME": o.name}
    return {"ModelName": model_name, "ExecutionRoleArn": o.role, "PrimaryContainer": {"Image": o.image, "Environment": env}}


def config_request(o: Options, config_name: str, model_name: str) -> dict:
    output: dict[str, Any] = {"S3OutputPath": o.output, "S3FailurePath": o.output + "_failures/"}
    topics = {key: arn for key, arn in (("SuccessTopic", o.sns_success), ("ErrorTopic", o.sns_error)) if arn}
    if topics:
        output["NotificationConfig"] = topics
    variant = {
        "VariantName": VARIANT, "ModelName": model_name, "InstanceType": o.instance_type,
        # SageMaker refuses 0 at creation; autoscaling takes it down to min-instances
        "InitialInstanceCount": max(1, o.min_instances),
        # /ping answers 503 until the worker has loaded its first model
        "ContainerStartupHealthCheckTimeoutInSeconds": o.startup_timeout,
    }
    return {"EndpointConfigName": config_name, "ProductionVariants": [variant], "AsyncInferenceConfig": {
        "OutputConfig": output, "ClientConfig": {"MaxConcurrentInvocationsPerInstance": o.max_concurrent}}}


def scaling_ids(name: str) -> dict:
    """The three keys naming the variant to Application Auto Scaling."""
    return {"ServiceNamespace": "sagemaker", "ResourceId": f"endpoint/{name}/variant/{VARIANT}", "ScalableDimension": DIMENSION}


def policy_names(name: str) -> tuple[str, str, str]:
    """(target-tracking policy, scale-out-from-zero step policy, its alarm) names."""
    return f"{name}-backlog-per-instance", f"{name}-scale-out-from-zero", f"{name}-HasBacklogWithoutCapacity"


def target_request(o: Options) -> dict:
    return {**scaling_ids(o.name), "MinCapacity": o.min_instances, "MaxCapacity": o.max_instances}


def backlog_policy_request(o: Options) -> dict:
    metric = {"MetricName": "ApproximateBacklogSizePerInstance", "Namespace": "AWS/SageMaker",
              "Dimensions": [{"Name": "EndpointName", "Value": o.name}], "Statistic": "Average"}
    return {"PolicyName": policy_names(o.name)[0], **scaling_ids(o.name), "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": float(o.target_backlog), "CustomizedMetricSpecification": metric,
                "ScaleInCooldown": o.scale_in_cooldown, "ScaleOutCooldown": o.scale_out_cooldown}}


def zero_policy_request(o: Options) -> dict:
    # the cooldown keeps a still-starting first instance from triggering a second +1
    return {"PolicyName": policy_names(o.name)[1], **scaling_ids(o.name), "PolicyType": "StepScaling",
            "StepScalingPolicyConfiguration": {
                "AdjustmentType": "ChangeInCapacity", "MetricAggregationType": "Average", "Cooldown": o.scale_out_cooldown,
                "StepAdjustments": [{"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}]}}


def zero_alarm_request(o: Options, policy_arn: str) -> dict:
    return {"AlarmName": policy_names(o.name)[2],
            "AlarmDescription": f"Jobs queued on {o.name} with no instance: scale out from zero",
            "Namespace": "AWS/SageMaker", "MetricName": "HasBacklogWithoutCapacity",
            "Dimensions": [{"Name": "EndpointName", "Value": o.name}], "Statistic": "Average",
            "Period": 60, "EvaluationPeriods": 1, "DatapointsToAlarm": 1, "Threshold": 1.0,
            "ComparisonOperator": "GreaterThanOrEqualToThreshold", "TreatMissingData": "missing",
            "AlarmActions": [policy_arn]}


def plan(o: Options, stamp: str) -> list[dict]:
    """The mutating calls a run makes, in order (what ``--dry-run`` prints)."""
    model = config = f"{o.name[:43]}-{stamp}"
    calls: list[tuple[str, str, dict]] = []
    if not o.scaling_only:
        calls += [("sagemaker", "create_model", model_request(o, model)),
                  ("sagemaker", "create_endpoint_config", config_request(o, config, model))]
        if o.update:
            calls.append(("sagemaker", "update_endpoint (create_endpoint if it does not exist yet)",
                          {"EndpointName": o.name, "EndpointConfigName": config, "RetainAllVariantProperties": "true unless the instance type changes"}))
        else:
            calls.append(("sagemaker", "create_endpoint", {"EndpointName": o.name, "EndpointConfigName": config}))
    if o.wait or o.scaling_only:
        calls += [("application-autoscaling", "register_scalable_target", target_request(o)),
                  ("application-autoscaling", "put_scaling_policy", backlog_policy_request(o))]
        if o.min_instances == 0:
            calls += [("application-autoscaling", "put_scaling_policy", zero_policy_request(o)),
                      ("cloudwatch", "put_metric_alarm", zero_alarm_request(o, "<PolicyARN of the step policy above>"))]
    return [{"service": s, "operation": op, "params": p} for s, op, p in calls]
