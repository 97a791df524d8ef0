"""Async submission: InService check first, then created record + index key + input.json, then InvokeEndpointAsync."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import boto3
import pytest
from botocore.stub import ANY, Stubber

from client.config import Clients
from client.jobs import index_key, parse_time
from client.submit import lora_tags, txt2img_payload
from client.config import CliError


def aws(service: str):
    return boto3.client(service, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")


def describe(status: str, name: str = "sd-async") -> dict:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return {"EndpointName": name, "EndpointArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint/{name}",
            "EndpointConfigName": "cfg", "EndpointStatus": status, "CreationTime": now, "LastModifiedTime": now}


@pytest.fixture
def stubbed(s3_client):
    sm, rt = aws("sagemaker"), aws("sagemaker-runtime")
    with Stubber(sm) as sm_stub, Stubber(rt) as rt_stub:
        yield sm_stub, rt_stub, Clients(s3_factory=lambda: s3_client, sagemaker_factory=lambda: sm, runtime_factory=lambda: rt)


def keys(s3_client, bucket):
    return sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_txt2img_to_in_service_endpoint(sdctl, s3_client, s3_bucket, stubbed):
    sm_stub, rt_stub, clients = stubbed
    sm_stub.add_response("describe_endpoint", describe("InService"), {"EndpointName": "sd-async"})
    rt_stub.add_response(
        "invoke_endpoint_async",
        {"InferenceId": "j-1", "OutputLocation": f"s3://{s3_bucket}/async-out/x.out"},
        {"EndpointName": "sd-async", "InputLocation": f"s3://{s3_bucket}/out/j-1/input.json",
         "ContentType": "application/json", "InferenceId": "j-1"},
    )
    result = sdctl("--output", f"s3://{s3_bucket}/out/", "txt2img", "--prompt", "a cat", "--steps", "3",
                   "--checkpoint", "tiny-sd1", "--lora", "style:0.8", "--endpoint", "sd-async", "--id", "j-1", clients=clients)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "j-1"
    sm_stub.assert_no_pending_responses()
    rt_stub.assert_no_pending_responses()
    record = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="out/j-1/job.json")["Body"].read())
    assert record["status"] == "created" and record["endpoint"] == "sd-async" and record["checkpoint"] == "tiny-sd1"
    assert record["task"] == "txt2img" and record["progress"] == 0.0
    expected_index = "out/" + index_key(parse_time(record["created"]), "txt2img", "created", "j-1")
    assert keys(s3_client, s3_bucket) == sorted([expected_index, "out/j-1/input.json", "out/j-1/job.json"])
    body = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="out/j-1/input.json")["Body"].read())
    assert body == {"task": "txt2img", "id": "j-1", "output": {"inline": False},
                    "payload": {"prompt": "a cat <lora:style:0.8>", "steps": 3, "override_settings": {"sd_model_checkpoint": "tiny-sd1"}}}
    listed = sdctl("--output", f"s3://{s3_bucket}/out/", "jobs", clients=clients)
    assert listed.stdout.strip().endswith("-txt2img-created-j-1")


@pytest.mark.parametrize("status", ["Creating", "Updating", "Failed", "OutOfService"])
def test_not_in_service_uploads_nothing(sdctl, s3_client, s3_bucket, stubbed, tmp_path, status):
    sm_stub, _rt, clients = stubbed
    sm_stub.add_response("describe_endpoint", describe(status), {"EndpointName": "sd-async"})
    result = sdctl("--output", f"s3://{s3_bucket}/out/", "txt2img", "-p", "x", "--endpoint", "sd-async", clients=clients)
    assert result.exit_code == 3 and status in result.output
    assert keys(s3_client, s3_bucket) == []


def test_missing_endpoint_and_submit_file(sdctl, s3_client, s3_bucket, stubbed, tmp_path):
    sm_stub, rt_stub, clients = stubbed
    sm_stub.add_client_error("describe_endpoint", "ValidationException", "Could not find endpoint \"nope\".")
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"task": "txt2img", "id": "from-file", "payload": {"prompt": "p", "seed": 5}}))
    result = sdctl("--output", f"s3://{s3_bucket}/out/", "submit", request, "--endpoint", "nope", clients=clients)
    assert result.exit_code == 3 and "nope" in result.output and "not found" in result.output
    assert keys(s3_client, s3_bucket) == []
    sm_stub.add_response("describe_endpoint", describe("InService", "ep"), {"EndpointName": "ep"})
    rt_stub.add_response("invoke_endpoint_async", {"InferenceId": "from-file"},
                         {"EndpointName": "ep", "InputLocation": ANY, "ContentType": "application/json", "InferenceId": "from-file"})
    result = sdctl("--output", f"s3://{s3_bucket}/out/", "submit", request, "--endpoint", "ep", clients=clients)
    assert result.exit_code == 0, result.output
    body = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="out/from-file/input.json")["Body"].read())
    assert body["payload"] == {"prompt": "p", "seed": 5}


def test_usage_errors(sdctl, tmp_path, stubbed):
    _sm, _rt, clients = stubbed
    assert sdctl("--output", str(tmp_path), "txt2img", "-p", "x", "--endpoint", "e", clients=clients).exit_code == 2  # async needs S3
    assert sdctl("txt2img", "-p", "x", clients=clients).exit_code == 2  # no target
    assert sdctl("txt2img", "-p", "x", "--local", "http://a", "--endpoint", "e", clients=clients).exit_code == 2
    assert sdctl("txt2img", "-p", "x", "--lora", "bad", "--local", "http://a", clients=clients).exit_code == 2
    assert sdctl("txt2img", "-p", "x", "--id", "../x", "--local", "http://a", clients=clients).exit_code == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    assert sdctl("submit", bad, "--local", "http://a", clients=clients).exit_code == 2


def test_payload_from_flags():
    payload = txt2img_payload(prompt="p", negative="n", sampler="DPM++ 2M", scheduler="Karras", steps=20, cfg=7.0, width=512,
                              height=768, seed=1, batch=2, n_iter=3, checkpoint="m", vae="None", clip_skip=2, loras=["a:1", "b:-0.5"])
    assert payload == {"prompt": "p <lora:a:1> <lora:b:-0.5>", "negative_prompt": "n", "sampler_name": "DPM++ 2M",
                       "scheduler": "Karras", "steps": 20, "cfg_scale": 7.0, "width": 512, "height": 768, "seed": 1,
                       "batch_size": 2, "n_iter": 3,
                       "override_settings": {"sd_model_checkpoint": "m", "sd_vae": "None", "CLIP_stop_at_last_layers": 2}}
    with pytest.raises(CliError):
        lora_tags(["x:y"])
