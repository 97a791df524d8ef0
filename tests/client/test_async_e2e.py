"""The async workflow end to end: sdctl submits, a harness plays SageMaker async, the real server runs the job.

SageMaker has no local server: describe/invoke are stubbed, and the harness does
what SageMaker async inference does with an invocation — read the InputLocation
object, POST it to the container's /invocations, store the answer under the
endpoint's output path.
"""

from __future__ import annotations

import json

import httpx
from PIL import Image

from tests.client.test_submit_async import describe, stubbed  # noqa: F401 - fixture
from tests.support.server import ServerProcess


def play_sagemaker(s3_client, server_url: str, input_location: str, output_key: str, bucket: str) -> dict:
    key = input_location.split(f"s3://{bucket}/", 1)[1]
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    r = httpx.post(server_url + "/invocations", content=body, headers={"Content-Type": "application/json"}, timeout=120)
    s3_client.put_object(Bucket=bucket, Key=output_key, Body=r.content)
    assert r.status_code == 200, r.text
    return r.json()


def expect_submission(stubbed, bucket: str, job_id: str) -> str:  # noqa: F811
    """SageMaker's side of one async submission to the InService ``sd-async``; returns the input's location."""
    sm_stub, rt_stub, _clients = stubbed
    sm_stub.add_response("describe_endpoint", describe("InService"), {"EndpointName": "sd-async"})
    input_location = f"s3://{bucket}/out/{job_id}/input.json"
    rt_stub.add_response(
        "invoke_endpoint_async",
        {"InferenceId": job_id, "OutputLocation": f"s3://{bucket}/async-out/{job_id}.out"},
        {"EndpointName": "sd-async", "InputLocation": input_location, "ContentType": "application/json", "InferenceId": job_id},
    )
    return input_location


def test_submit_async_then_list_wait_and_get(sdctl, stubbed, s3_client, s3_bucket, s3_env, tiny_model_store, tmp_path):  # noqa: F811
    out = f"s3://{s3_bucket}/out/"
    server = ServerProcess(
        {**s3_env, "MODEL_STORE": str(tiny_model_store), "OUTPUT": out, "CACHE_DIR": str(tmp_path / "cache"), "ENDPOINT_NAME": "sd-async"},
        log_path=tmp_path / "server.log",
    ).start()
    try:
        _sm_stub, _rt_stub, clients = stubbed
        input_location = expect_submission(stubbed, s3_bucket, "job-a")
        env = {**s3_env, "SD_OUTPUT": out}
        submitted = sdctl("txt2img", "--prompt", "a lighthouse", "--steps", "2", "--width", "64", "--height", "64",
                          "--seed", "5", "--checkpoint", "tiny-sd1", "--endpoint", "sd-async", "--id", "job-a",
                          clients=clients, env=env)
        assert submitted.exit_code == 0, submitted.output
        assert sdctl("jobs", clients=clients, env=env).stdout.strip().endswith("-txt2img-created-job-a")

        answer = play_sagemaker(s3_client, server.url, input_location, "async-out/job-a.out", s3_bucket)
        assert answer["id"] == "job-a" and answer["status"] == "succeed" and answer["endpoint"] == "sd-async"

        listed = sdctl("jobs", "--json", clients=clients, env=env)
        assert listed.exit_code == 0, listed.output
        assert "succeed" in listed.stdout and "created" not in sdctl("jobs", clients=clients, env=env).stdout
        assert sdctl("wait", "job-a", clients=clients, env=env).exit_code == 0
        got = sdctl("get", "job-a", "-o", str(tmp_path / "dl"), clients=clients, env=env)
        assert got.exit_code == 0, got.output
        png = next((tmp_path / "dl").rglob("image-0.png"))
        assert Image.open(png).info["parameters"].startswith("a lighthouse\nSteps: 2")
        record = json.loads(next((tmp_path / "dl").rglob("job.json")).read_text())
        assert record["status"] == "succeed"
        # SageMaker may deliver the same invocation twice: the record comes back unchanged
        again = play_sagemaker(s3_client, server.url, input_location, "async-out/job-a.out", s3_bucket)
        assert again == answer

        # "send to img2img": job-a's image and parameters start an async img2img job
        input_b = expect_submission(stubbed, s3_bucket, "job-b")
        sent = sdctl("img2img", "--from-job", "job-a", "--denoising-strength", "0.5", "--endpoint", "sd-async",
                     "--id", "job-b", clients=clients, env=env)
        assert sent.exit_code == 0, sent.output
        answer_b = play_sagemaker(s3_client, server.url, input_b, "async-out/job-b.out", s3_bucket)
        assert answer_b["status"] == "succeed" and answer_b["task"] == "img2img"
        lines = sdctl("jobs", clients=clients, env=env).stdout.split()
        assert [line.endswith(f"-{j}") for line, j in zip(lines, ("job-b", "job-a"))] == [True, True]  # newest first
        assert "-img2img-succeed-" in lines[0]
        assert sdctl("get", "job-b", "-o", str(tmp_path / "dl-b"), clients=clients, env=env).exit_code == 0
        text = Image.open(next((tmp_path / "dl-b").rglob("image-0.png"))).info["parameters"]
        assert text.startswith("a lighthouse\nSteps: 2") and "Denoising strength: 0.5" in text and "Seed: 5" in text
    finally:
        server.stop()
