"""sd-create-endpoint against moto (SageMaker, Application Auto Scaling, CloudWatch) and,
for what moto lacks (update_endpoint, endpoint states), botocore's Stubber."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws
from typer.testing import CliRunner

from container.create_endpoint import Aws, app, apply_scaling
from container.endpoint_spec import validate

REGION = "us-east-1"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sd-endpoint:abc1234"
ROLE = "arn:aws:iam::123456789012:role/service-role/sd-sagemaker"
TOPIC = "arn:aws:sns:us-east-1:123456789012:sd-jobs"
RESOURCE = "endpoint/sd-test/variant/AllTraffic"
NOW = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
STAMPED = "sd-test-20260102-030405-678"  # model and config name made at NOW
# moto's instance-type list predates ml.g5, so the moto runs use a GPU type it knows
BASE = ["--name", "sd-test", "--image", IMAGE, "--role", ROLE, "--model-store", "s3://sd-bucket/models",
        "--output", "s3://sd-bucket/outputs/", "--region", REGION, "--instance-type", "ml.g4dn.xlarge"]


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch, tmp_path):
    """Fake credentials, no ~/.aws files, no instance metadata lookups."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# one session for every client of every test: its loader parses each (large) service model once;
# mock_aws drops boto3's default session, so boto3.client() would parse them again per test
SESSION = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)


@pytest.fixture
def moto():
    with mock_aws():
        yield {s: SESSION.client(s) for s in ("sagemaker", "application-autoscaling", "cloudwatch")}


def run(*args, aws: Aws | None = None, clients: dict | None = None):
    """The CLI in-process; ``clients``: moto's, reused (a new boto3 session re-reads SageMaker's large model)."""
    aws = aws or Aws(sleep=lambda s: None, factory=clients.__getitem__ if clients else None)
    return CliRunner().invoke(app, [str(a) for a in args], obj=aws)


def no_calls(service):
    raise AssertionError(f"a {service} client was made: no AWS call may happen here")


class Recorder:
    """Passes calls to a boto3 client and records their names in order."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name in ("meta", "exceptions") or not callable(attr):
            return attr

        def record(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)

        return record


# ------------------------------------------------------------------ create (moto)
def test_creates_async_endpoint_config_and_model(moto):
    result = run(*BASE, "--sns-success", TOPIC, "--sns-error", TOPIC + "-errors", "--env", "DEFAULT_CHECKPOINT=v1-5.safetensors", clients=moto)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    sm = moto["sagemaker"]
    endpoint = sm.describe_endpoint(EndpointName="sd-test")
    assert endpoint["EndpointStatus"] == "InService" and endpoint["EndpointConfigName"] == summary["endpoint_config"]
    config = sm.describe_endpoint_config(EndpointConfigName=summary["endpoint_config"])
    out = config["AsyncInferenceConfig"]["OutputConfig"]
    assert out["S3OutputPath"] == "s3://sd-bucket/outputs/"
    assert out["S3FailurePath"] == "s3://sd-bucket/outputs/_failures/"
    assert out["NotificationConfig"] == {"SuccessTopic": TOPIC, "ErrorTopic": TOPIC + "-errors"}
    assert config["AsyncInferenceConfig"]["ClientConfig"] == {"MaxConcurrentInvocationsPerInstance": 1}
    (variant,) = config["ProductionVariants"]
    assert (variant["VariantName"], variant["InstanceType"], variant["InitialInstanceCount"]) == ("AllTraffic", "ml.g4dn.xlarge", 1)
    model = sm.describe_model(ModelName=variant["ModelName"])
    assert model["ExecutionRoleArn"] == ROLE and model["PrimaryContainer"]["Image"] == IMAGE
    env = model["PrimaryContainer"]["Environment"]
    assert env["MODEL_STORE"] == "s3://sd-bucket/models/" and env["OUTPUT"] == "s3://sd-bucket/outputs/"
    assert env["ENDPOINT_NAME"] == "sd-test" and env["DEFAULT_CHECKPOINT"] == "v1-5.safetensors" and env["AWS_REGION"] == REGION


def test_autoscaling_tracks_backlog_and_scales_out_from_zero(moto):
    result = run(*BASE, "--max-instances", 3, "--target-backlog", 4, clients=moto)
    assert result.exit_code == 0, result.output
    aas, cw = moto["application-autoscaling"], moto["cloudwatch"]
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["ScalableDimension"]) == (RESOURCE, "sagemaker:variant:DesiredInstanceCount")
    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, 3)
    policies = {p["PolicyType"]: p for p in aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=RESOURCE)["ScalingPolicies"]}
    tracking = policies["TargetTrackingScaling"]["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 4.0
    assert tracking["CustomizedMetricSpecification"] == {
        "MetricName": "ApproximateBacklogSizePerInstance", "Namespace": "AWS/SageMaker",
        "Dimensions": [{"Name": "EndpointName", "Value": "sd-test"}], "Statistic": "Average"}
    step = policies["StepScaling"]["StepScalingPolicyConfiguration"]
    assert step["AdjustmentType"] == "ChangeInCapacity" and step["StepAdjustments"] == [{"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}]
    (alarm,) = cw.describe_alarms()["MetricAlarms"]
    assert (alarm["Namespace"], alarm["MetricName"], alarm["Statistic"]) == ("AWS/SageMaker", "HasBacklogWithoutCapacity", "Average")
    assert alarm["Dimensions"] == [{"Name": "EndpointName", "Value": "sd-test"}]
    assert (alarm["Period"], alarm["EvaluationPeriods"], alarm["Threshold"], alarm["ComparisonOperator"]) == (60, 1, 1.0, "GreaterThanOrEqualToThreshold")
    assert alarm["AlarmActions"] == [policies["StepScaling"]["PolicyARN"]]


def test_min_instances_above_zero_starts_that_many_and_needs_no_alarm(moto):
    result = run(*BASE, "--min-instances", 2, "--max-instances", 4, clients=moto)
    assert result.exit_code == 0, result.output
    config = moto["sagemaker"].describe_endpoint_config(EndpointConfigName=json.loads(result.stdout)["endpoint_config"])
    assert config["ProductionVariants"][0]["InitialInstanceCount"] == 2
    (target,) = moto["application-autoscaling"].describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 4)
    policies = moto["application-autoscaling"].describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert [p["PolicyType"] for p in policies] == ["TargetTrackingScaling"]
    assert moto["cloudwatch"].describe_alarms()["MetricAlarms"] == []


def test_existing_endpoint_without_update_is_refused(moto):
    assert run(*BASE, clients=moto).exit_code == 0
    models = moto["sagemaker"].list_models()["Models"]
    result = run(*BASE, clients=moto)
    assert result.exit_code == 3
    assert "already exists" in result.stderr and "--update" in result.stderr
    assert moto["sagemaker"].list_models()["Models"] == models  # refused before creating anything


def test_update_of_a_missing_endpoint_creates_it(moto):
    result = run(*BASE, "--update", clients=moto)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["action"] == "created"
    assert moto["sagemaker"].describe_endpoint(EndpointName="sd-test")["EndpointStatus"] == "InService"


def test_no_wait_then_scaling_only(moto):
    result = run(*BASE, "--no-wait", clients=moto)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["autoscaling"] is None and "--scaling-only" in result.stderr
    assert moto["application-autoscaling"].describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    result = run("--name", "sd-test", "--region", REGION, "--scaling-only", "--max-instances", 5, clients=moto)
    assert result.exit_code == 0, result.output
    (target,) = moto["application-autoscaling"].describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert target["MaxCapacity"] == 5
    assert run("--name", "sd-other", "--region", REGION, "--scaling-only", clients=moto).exit_code == 3


def test_sdctl_endpoints_lists_it_as_async(moto):
    from client.cli import app as sdctl
    from client.config import Clients

    assert run(*BASE, clients=moto).exit_code == 0
    result = CliRunner().invoke(sdctl, ["endpoints"], obj=Clients(sagemaker_factory=lambda: moto["sagemaker"]))
    assert result.exit_code == 0, result.output
    (row,) = [[c.strip() for c in line.split("│")[1:5]] for line in result.stdout.splitlines() if "sd-test" in line]
    assert row == ["sd-test", "InService", "ml.g4dn.xlarge", "async"]


# ------------------------------------------------------------------ no calls
def test_dry_run_prints_the_calls_and_makes_none():
    result = run(*BASE, "--dry-run", aws=Aws(factory=no_calls, now=lambda: NOW))
    assert result.exit_code == 0, result.output
    calls = json.loads(result.stdout)
    assert [(c["service"], c["operation"]) for c in calls] == [
        ("sagemaker", "create_model"), ("sagemaker", "create_endpoint_config"), ("sagemaker", "create_endpoint"),
        ("application-autoscaling", "register_scalable_target"), ("application-autoscaling", "put_scaling_policy"),
        ("application-autoscaling", "put_scaling_policy"), ("cloudwatch", "put_metric_alarm")]
    assert calls[2]["params"] == {"EndpointName": "sd-test", "EndpointConfigName": STAMPED}
    assert calls[6]["params"]["MetricName"] == "HasBacklogWithoutCapacity"


@pytest.mark.parametrize(("change", "named"), [
    ({"--name": "sd_test"}, "--name"),
    ({"--name": "-sd"}, "--name"),
    ({"--name": "a" * 64}, "--name"),
    ({"--image": "nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04"}, "--image"),
    ({"--image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/Sd-Endpoint:x"}, "--image"),
    ({"--role": "sd-sagemaker"}, "--role"),
    ({"--role": "arn:aws:iam::123456789012:user/alice"}, "--role"),
    ({"--model-store": "./models"}, "--model-store"),
    ({"--output": "https://sd-bucket/outputs/"}, "--output"),
    ({"--env": "MODEL_STORE=s3://other/"}, "--env MODEL_STORE"),
    ({"--env": "NO-EQUALS"}, "--env"),
    ({"--min-instances": "3"}, "--min-instances"),  # above the default max of 2
    ({"--sns-error": "sd-jobs"}, "--sns-error"),
    ({"--instance-type": "g5.xlarge"}, "--instance-type"),
    ({"--region": "eu-west-1"}, "SageMaker pulls only from ECR in its own region"),
    ({"--region": "Virginia"}, "region 'Virginia'"),
])
def test_bad_input_is_refused_before_any_call(change, named):
    args = list(BASE)
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    result = run(*args, aws=Aws(factory=no_calls))
    assert result.exit_code == 2, result.output
    assert named in result.stderr and "nothing was created" in result.stderr


def test_no_credentials_is_exit_5(monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    result = run(*BASE)
    assert result.exit_code == 5
    assert "no AWS credentials" in result.stderr


# ------------------------------------------------------------------ Stubber: states and update
def endpoint(status: str, config: str, reason: str | None = None) -> dict:
    desc = {"EndpointName": "sd-test", "EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/sd-test",
            "EndpointConfigName": config, "EndpointStatus": status, "CreationTime": NOW, "LastModifiedTime": NOW}
    return {**desc, "FailureReason": reason} if reason else desc


def stubbed(moto: dict | None = None) -> tuple[Aws, Stubber]:
    """An Aws whose SageMaker client is stubbed (moto lacks update_endpoint); the others moto's or none."""
    sm = SESSION.client("sagemaker")
    stub = Stubber(sm)
    clock = {"t": 0.0}

    def sleep(seconds):
        clock["t"] += seconds

    others = moto or {}
    aws = Aws(factory=lambda s: sm if s == "sagemaker" else others.get(s) or no_calls(s), now=lambda: NOW,
              sleep=sleep, monotonic=lambda: clock["t"])
    return aws, stub


def expect_created(stub: Stubber) -> None:
    stub.add_client_error("describe_endpoint", "ValidationException", "Could not find endpoint \"sd-test\".")
    stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:123456789012:model/m"}, {
        "ModelName": STAMPED, "ExecutionRoleArn": ROLE, "PrimaryContainer": ANY})
    stub.add_response("create_endpoint_config", {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/c"},
                      {"EndpointConfigName": STAMPED, "ProductionVariants": ANY, "AsyncInferenceConfig": ANY})
    stub.add_response("create_endpoint", {"EndpointArn": endpoint("Creating", STAMPED)["EndpointArn"]},
                      {"EndpointName": "sd-test", "EndpointConfigName": STAMPED})


def test_failed_endpoint_is_exit_3_with_its_reason():
    aws, stub = stubbed()
    expect_created(stub)
    stub.add_response("describe_endpoint", endpoint("Creating", STAMPED))
    stub.add_response("describe_endpoint", endpoint("Failed", STAMPED, "The primary container did not pass the ping health check."))
    with stub:
        result = run(*BASE, aws=aws)
    assert result.exit_code == 3
    assert "Failed" in result.stderr and "ping health check" in result.stderr
    stub.assert_no_pending_responses()


def test_wait_gives_up_after_timeout():
    aws, stub = stubbed()
    expect_created(stub)
    for _ in range(3):  # t = 0, 15, 30
        stub.add_response("describe_endpoint", endpoint("Creating", STAMPED))
    with stub:
        result = run(*BASE, "--timeout", 30, aws=aws)
    assert result.exit_code == 3
    assert "still Creating after 30 s" in result.stderr and "--scaling-only" in result.stderr


def test_access_denied_is_exit_5_naming_the_permission():
    aws, stub = stubbed()
    stub.add_client_error("describe_endpoint", "ValidationException", "Could not find endpoint \"sd-test\".")
    stub.add_client_error("create_model", "AccessDeniedException", "User is not authorized to perform: sagemaker:CreateModel")
    with stub:
        result = run(*BASE, aws=aws)
    assert result.exit_code == 5
    assert "sagemaker:CreateModel" in result.stderr


def expect_update(stub: Stubber, old_type: str, retain: bool, rolled_back: bool = False) -> None:
    stub.add_response("describe_endpoint", endpoint("InService", "sd-test-old"))
    stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:123456789012:model/m"}, {
        "ModelName": STAMPED, "ExecutionRoleArn": ROLE, "PrimaryContainer": ANY})
    stub.add_response("create_endpoint_config", {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/c"},
                      {"EndpointConfigName": STAMPED, "ProductionVariants": ANY, "AsyncInferenceConfig": ANY})
    stub.add_response("describe_endpoint_config", {
        "EndpointConfigName": "sd-test-old", "EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/sd-test-old",
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "old", "InstanceType": old_type, "InitialInstanceCount": 1}],
        "CreationTime": NOW}, {"EndpointConfigName": "sd-test-old"})
    stub.add_response("update_endpoint", {"EndpointArn": endpoint("Updating", STAMPED)["EndpointArn"]},
                      {"EndpointName": "sd-test", "EndpointConfigName": STAMPED, "RetainAllVariantProperties": retain})
    stub.add_response("describe_endpoint", endpoint("Updating", "sd-test-old"))
    if rolled_back:
        stub.add_response("describe_endpoint", endpoint("InService", "sd-test-old", "Request to service failed. Rolled back."))
    else:
        stub.add_response("describe_endpoint", endpoint("InService", STAMPED))


def test_update_same_instance_type_keeps_count_and_drops_the_zero_pair(moto):
    aws, stub = stubbed(moto)
    # what an earlier deploy with --min-instances 0 left behind
    apply_scaling(validate("sd-test", None, None, None, None, REGION, scaling_only=True), aws, lambda m: None)
    assert len(moto["cloudwatch"].describe_alarms()["MetricAlarms"]) == 1
    expect_update(stub, "ml.g4dn.xlarge", retain=True)
    with stub:
        result = run(*BASE, "--update", "--min-instances", 1, aws=aws)
    assert result.exit_code == 0, result.output
    stub.assert_no_pending_responses()
    summary = json.loads(result.stdout)
    assert (summary["action"], summary["previous_endpoint_config"]) == ("updated", "sd-test-old")
    (target,) = moto["application-autoscaling"].describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert target["MinCapacity"] == 1
    policies = moto["application-autoscaling"].describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert [p["PolicyType"] for p in policies] == ["TargetTrackingScaling"]
    assert moto["cloudwatch"].describe_alarms()["MetricAlarms"] == []


def test_update_to_another_instance_type_deregisters_first(moto):
    aas = Recorder(moto["application-autoscaling"])
    aws, stub = stubbed({**moto, "application-autoscaling": aas})
    apply_scaling(validate("sd-test", None, None, None, None, REGION, scaling_only=True), aws, lambda m: None)
    aas.calls.clear()
    expect_update(stub, "ml.p3.2xlarge", retain=False)
    with stub:
        result = run(*BASE, "--update", aws=aws)
    assert result.exit_code == 0, result.output
    stub.assert_no_pending_responses()
    assert aas.calls[:3] == ["describe_scalable_targets", "deregister_scalable_target", "register_scalable_target"]
    (target,) = moto["application-autoscaling"].describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, 2)


def test_rolled_back_update_is_exit_3_and_leaves_scaling_alone(moto):
    aas = Recorder(moto["application-autoscaling"])
    aws, stub = stubbed({**moto, "application-autoscaling": aas})
    expect_update(stub, "ml.g4dn.xlarge", retain=True, rolled_back=True)
    with stub:
        result = run(*BASE, "--update", aws=aws)
    assert result.exit_code == 3
    assert "rolled-back update" in result.stderr and "Rolled back." in result.stderr
    assert aas.calls == []
