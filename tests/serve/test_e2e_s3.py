"""The server with its model store and its outputs in a real S3 server (SeaweedFS)."""

import base64
import json
from pathlib import Path

import httpx
import pytest

from tests.support.server import ServerProcess

SMALL = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 11}


def upload_tree(client, bucket: str, root: Path, prefix: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, prefix + path.relative_to(root).as_posix())


@pytest.fixture(scope="module")
def s3_server_proc(tiny_model_store, s3_server, s3_env, tmp_path_factory):
    client = s3_server.client()
    bucket = "e2e-models"
    client.create_bucket(Bucket=bucket)
    sd = Path(tiny_model_store) / "Stable-diffusion"
    for name in ("tiny-sd1.safetensors", "tiny-sd1.config"):
        src = sd / name
        if src.is_dir():
            upload_tree(client, bucket, src, f"models/Stable-diffusion/{name}/")
        else:
            client.upload_file(str(src), bucket, f"models/Stable-diffusion/{name}")
    tmp = tmp_path_factory.mktemp("s3e2e")
    proc = ServerProcess(
        {**s3_env, "MODEL_STORE": f"s3://{bucket}/models/", "OUTPUT": f"s3://{bucket}/outputs/", "CACHE_DIR": str(tmp / "cache"),
         "ALLOWED_S3_PREFIXES": f"s3://{bucket}/team/"},
        log_path=tmp / "server.log",
    ).start()
    proc.bucket, proc.client, proc.cache = bucket, client, tmp / "cache"
    try:
        yield proc
    finally:
        proc.stop()


def test_models_and_outputs_in_s3(s3_server_proc):
    srv = s3_server_proc
    r = httpx.post(srv.url + "/invocations", json={**SMALL, "override_settings": {"sd_model_checkpoint": "tiny-sd1"}}, timeout=120)
    assert r.status_code == 200, r.text + srv.log_tail()
    job_id = r.json()["job_id"]
    keys = {o["Key"] for o in srv.client.list_objects_v2(Bucket=srv.bucket, Prefix=f"outputs/{job_id}/")["Contents"]}
    assert keys == {f"outputs/{job_id}/{n}" for n in ("image-0.png", "params.json", "job.json")}
    record = json.loads(srv.client.get_object(Bucket=srv.bucket, Key=f"outputs/{job_id}/job.json")["Body"].read())
    assert record["status"] == "succeed"
    assert record["images"] == [f"s3://{srv.bucket}/outputs/{job_id}/image-0.png"]
    png = srv.client.get_object(Bucket=srv.bucket, Key=f"outputs/{job_id}/image-0.png")
    assert png["ContentType"] == "image/png"
    assert png["Body"].read() == base64.b64decode(r.json()["images"][0])
    # the checkpoint and its config folder came through the disk cache
    cached = srv.cache / srv.bucket / "models" / "Stable-diffusion"
    assert (cached / "tiny-sd1.safetensors").is_file() and (cached / "tiny-sd1.config" / "model_index.json").is_file()


def test_envelope_output_uri_overrides(s3_server_proc):
    srv = s3_server_proc
    body = {"id": "env-job", "payload": SMALL, "output": {"uri": f"s3://{srv.bucket}/elsewhere/", "inline": False}}
    r = httpx.post(srv.url + "/invocations", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeed" and r.json()["images"] == [f"s3://{srv.bucket}/elsewhere/env-job/image-0.png"]
    head = srv.client.head_object(Bucket=srv.bucket, Key="elsewhere/env-job/image-0.png")
    assert head["ContentLength"] > 0


def test_unknown_model_in_s3_is_404_naming_the_bucket(s3_server_proc):
    srv = s3_server_proc
    r = httpx.post(srv.url + "/invocations", json={**SMALL, "override_settings": {"sd_model_checkpoint": "ghost"}}, timeout=60)
    assert r.status_code == 404
    assert "ghost" in r.json()["detail"] and f"s3://{srv.bucket}/models/Stable-diffusion/" in r.json()["detail"]


def test_explicit_model_locations(s3_server_proc, tiny_model_store):
    """The envelope's ``models``: a checkpoint outside the store's folder, used under its file name; the allow-list holds."""
    srv = s3_server_proc
    sd = Path(tiny_model_store) / "Stable-diffusion"
    srv.client.upload_file(str(sd / "tiny-sd1.safetensors"), srv.bucket, "team/ckpt/explicit-sd1.safetensors")
    upload_tree(srv.client, srv.bucket, sd / "tiny-sd1.config", "team/ckpt/explicit-sd1.config/")
    uri = f"s3://{srv.bucket}/team/ckpt/explicit-sd1.safetensors"

    def post(models, **payload):
        body = {"task": "txt2img", "payload": {**SMALL, **payload}, "models": models}
        return httpx.post(srv.url + "/invocations", json=body, timeout=120)

    r = post({"Stable-diffusion": [uri]})  # no checkpoint named: the located one
    assert r.status_code == 200, r.text + srv.log_tail()
    key = f"outputs/{r.json()['job_id']}/params.json"
    params = json.loads(srv.client.get_object(Bucket=srv.bucket, Key=key)["Body"].read())
    assert params["checkpoint"]["location"] == uri and params["models"] == {"Stable-diffusion": [uri]}
    assert (srv.cache / srv.bucket / "team" / "ckpt" / "explicit-sd1.config" / "model_index.json").is_file()
    named = post({"Stable-diffusion": [uri]}, override_settings={"sd_model_checkpoint": "explicit-sd1 [0123456789]"})
    assert named.status_code == 200, named.text
    assert named.json()["images"] == r.json()["images"]  # same seed, same weights

    outside = f"s3://{srv.bucket}/private/x.safetensors"
    refused = post({"Stable-diffusion": [outside]})
    assert refused.status_code == 403, refused.text
    assert "models.Stable-diffusion[0]" in refused.text and "ALLOWED_S3_PREFIXES" in refused.text
    bad = post({"Lora": [f"s3://{srv.bucket}/team/a%2f..%2fx.safetensors"]})
    assert bad.status_code == 422 and "models.Lora[0]" in bad.text
    missing = post({"Stable-diffusion": [f"s3://{srv.bucket}/team/ckpt/nope.safetensors"]})
    assert missing.status_code == 404 and "models.Stable-diffusion[0]" in missing.text


def test_send_an_earlier_jobs_image_by_its_s3_location(s3_server_proc):
    """img2img from a previous job's output, named by URI (no base64 round trip through the client)."""
    srv = s3_server_proc
    first = httpx.post(srv.url + "/invocations", json={**SMALL, "override_settings": {"sd_model_checkpoint": "tiny-sd1"}}, timeout=120)
    assert first.status_code == 200, first.text
    uri = f"s3://{srv.bucket}/outputs/{first.json()['job_id']}/image-0.png"
    body = {"task": "img2img", "payload": {**SMALL, "init_images": [uri], "denoising_strength": 0.5,
                                           "override_settings": {"sd_model_checkpoint": "tiny-sd1"}}}
    r = httpx.post(srv.url + "/invocations", json=body, timeout=120)
    assert r.status_code == 200, r.text + srv.log_tail()
    key = f"outputs/{r.json()['job_id']}/params.json"
    params = json.loads(srv.client.get_object(Bucket=srv.bucket, Key=key)["Body"].read())
    assert params["image_sources"] == {"payload.init_images[0]": uri}
    assert params["request"]["init_images"][0].startswith("<")  # the recorded request holds a digest, not the image
    outside = httpx.post(srv.url + "/invocations", json={**body, "payload": {**body["payload"], "init_images": [f"s3://{srv.bucket}/private/x.png"]}},
                         timeout=60)
    assert outside.status_code == 403 and "payload.init_images[0]" in outside.text
