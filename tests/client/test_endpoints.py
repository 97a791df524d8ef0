"""`sdctl endpoints` against moto's SageMaker mock."""

import boto3
from moto import mock_aws

from client.config import Clients


def make(sm, name: str, instance: str, is_async: bool) -> None:
    sm.create_model(ModelName=f"{name}-model", ExecutionRoleArn="arn:aws:iam::123456789012:role/sm",
                    PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/sd:latest"})
    config = {"EndpointConfigName": f"{name}-cfg", "ProductionVariants": [
        {"VariantName": "main", "ModelName": f"{name}-model", "InitialInstanceCount": 1, "InstanceType": instance}]}
    if is_async:
        config["AsyncInferenceConfig"] = {"OutputConfig": {"S3OutputPath": "s3://b/async/"}}
    sm.create_endpoint_config(**config)
    sm.create_endpoint(EndpointName=name, EndpointConfigName=f"{name}-cfg")


def test_lists_status_instance_and_mode(sdctl, monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        sm = boto3.client("sagemaker", region_name="us-east-1")
        make(sm, "sd-async", "ml.p3.2xlarge", True)
        make(sm, "sd-rt", "ml.g4dn.xlarge", False)
        result = sdctl("endpoints", clients=Clients(sagemaker_factory=lambda: sm))
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]] for line in result.stdout.splitlines() if "sd-" in line}
    assert rows["sd-async"] == ["InService", "ml.p3.2xlarge", "async"]
    assert rows["sd-rt"] == ["InService", "ml.g4dn.xlarge", "real-time"]
