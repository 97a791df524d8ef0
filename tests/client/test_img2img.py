"""`sdctl img2img`: the A1111 img2img body from flags and files, "send to img2img" (--from-job), errors before any upload.

The async path (Stubber for SageMaker, SeaweedFS for S3) is where the body can be
read back exactly: ``input.json`` holds the envelope the endpoint will receive.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from botocore.stub import ANY
from PIL import Image

from client.config import CliError
from client.img2img import (
    INPAINTING_FILLS,
    RESIZE_MODES,
    choice,
    img2img_payload,
    is_image,
    parse_from_job,
)
from tests.client.conftest import put, write_job
from tests.client.test_submit_async import describe, keys, stubbed  # noqa: F401 - fixture


def png(color, size=(16, 16), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def expect_invoke(sm_stub, rt_stub, job_id: str) -> None:
    sm_stub.add_response("describe_endpoint", describe("InService"), {"EndpointName": "sd-async"})
    rt_stub.add_response("invoke_endpoint_async", {"InferenceId": job_id},
                         {"EndpointName": "sd-async", "InputLocation": ANY, "ContentType": "application/json", "InferenceId": job_id})


def input_body(s3_client, bucket: str, job_id: str) -> dict:
    return json.loads(s3_client.get_object(Bucket=bucket, Key=f"out/{job_id}/input.json")["Body"].read())


def test_choice_accepts_index_or_name():
    assert choice("1", RESIZE_MODES, "--resize-mode") == 1
    assert choice("Crop AND resize", RESIZE_MODES, "--resize-mode") == 1
    assert choice("just resize (latent upscale)", RESIZE_MODES, "--resize-mode") == 3
    assert choice("latent noise", INPAINTING_FILLS, "--inpainting-fill") == 2
    assert choice(None, RESIZE_MODES, "--resize-mode") is None
    for bad in ("4", "-1", "stretch"):
        with pytest.raises(CliError) as err:
            choice(bad, RESIZE_MODES, "--resize-mode")
        assert err.value.code == 2 and "0 (Just resize)" in err.value.message


def test_payload_rules():
    body = img2img_payload({"prompt": "p", "steps": 3}, ["AAA"], denoising_strength=0.4, resize_mode=2, mask="MMM",
                           mask_blur=4, inpainting_fill=1, inpaint_full_res=True, inpaint_full_res_padding=16,
                           inpainting_mask_invert=True)
    assert body == {"prompt": "p", "steps": 3, "init_images": ["AAA"], "denoising_strength": 0.4, "resize_mode": 2,
                    "mask": "MMM", "mask_blur": 4, "inpainting_fill": 1, "inpaint_full_res": True,
                    "inpaint_full_res_padding": 16, "inpainting_mask_invert": 1}
    assert img2img_payload({"prompt": ""}, ["A"]) == {"prompt": "", "init_images": ["A"]}  # only what was given
    for kwargs, words in (
        ({"denoising_strength": 1.5}, "between 0 and 1"),
        ({"mask_blur": 4}, "--mask-blur only apply with --mask"),
        ({"inpaint_full_res": True}, "--inpaint-full-res only apply"),
        ({"mask": "M", "mask_blur": -1}, "0 or more"),
    ):
        with pytest.raises(CliError) as err:
            img2img_payload({"prompt": ""}, ["A"], **kwargs)
        assert words in err.value.message
    with pytest.raises(CliError, match="needs an init image"):
        img2img_payload({"prompt": ""}, [])


def test_from_job_spec_and_image_sniffing():
    assert parse_from_job("abc-1") == ("abc-1", 0)
    assert parse_from_job("3f2b.x_y:12") == ("3f2b.x_y", 12)
    for bad in ("", "a:b", "a:-1", "../x", "a:1:2"):
        with pytest.raises(CliError):
            parse_from_job(bad)
    assert is_image(png("red")) and not is_image(b"{\"json\": 1}")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="WEBP")
    assert is_image(buf.getvalue())


def test_img2img_flags_to_async_body(sdctl, s3_client, s3_bucket, stubbed, tmp_path):  # noqa: F811
    sm_stub, rt_stub, clients = stubbed
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    init.write_bytes(png("red"))
    mask.write_bytes(png(255, mode="L"))
    expect_invoke(sm_stub, rt_stub, "i-1")
    result = sdctl("--output", f"s3://{s3_bucket}/out/", "img2img", "--init-image", init, "--prompt", "a red barn",
                   "--negative", "fog", "--steps", "4", "--seed", "9", "--cfg", "6.5", "--width", "64", "--height", "64",
                   "--checkpoint", "tiny-sd1", "--clip-skip", "2", "--lora", "ink:0.5",
                   "--denoising-strength", "0.35", "--resize-mode", "crop and resize", "--mask", mask, "--mask-blur", "3",
                   "--inpainting-fill", "original", "--inpaint-full-res", "--inpaint-full-res-padding", "8",
                   "--inpainting-mask-invert", "--endpoint", "sd-async", "--id", "i-1", clients=clients)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "i-1"
    sm_stub.assert_no_pending_responses()
    rt_stub.assert_no_pending_responses()
    body = input_body(s3_client, s3_bucket, "i-1")
    assert body["task"] == "img2img" and body["id"] == "i-1"
    payload = body["payload"]
    assert [base64.b64decode(b) for b in payload.pop("init_images")] == [init.read_bytes()]
    assert base64.b64decode(payload.pop("mask")) == mask.read_bytes()
    assert payload == {"prompt": "a red barn <lora:ink:0.5>", "negative_prompt": "fog", "steps": 4, "cfg_scale": 6.5,
                       "width": 64, "height": 64, "seed": 9, "denoising_strength": 0.35, "resize_mode": 1, "mask_blur": 3,
                       "inpainting_fill": 1, "inpaint_full_res": True, "inpaint_full_res_padding": 8,
                       "inpainting_mask_invert": 1,
                       "override_settings": {"sd_model_checkpoint": "tiny-sd1", "CLIP_stop_at_last_layers": 2}}
    record = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="out/i-1/job.json")["Body"].read())
    assert record["task"] == "img2img" and record["status"] == "created"


def source_job(s3_client, bucket: str, job_id: str = "src") -> list[bytes]:
    """A succeeded 2-image txt2img job laid out as the container writes it (record, index, images, params.json)."""
    from tests.client.conftest import created_at

    images = [png("red"), png("blue")]
    write_job(s3_client, bucket, "out/", job_id, created_at(1), "txt2img", "succeed",
              images=[f"s3://{bucket}/out/{job_id}/image-{n}.png" for n in range(2)], checkpoint="tiny-sd1")
    for n, data in enumerate(images):
        put(s3_client, bucket, f"out/{job_id}/image-{n}.png", data)
    params = {
        "job_id": job_id, "task": "txt2img",
        "params": {"prompt": "a lighthouse <lora:ink:0.7>", "negative_prompt": "blurry", "seeds": [100, 101],
                   "subseeds": [5, 6], "subseed_strength": 0.0, "sampler_name": "Euler a", "schedule_type": "Automatic",
                   "steps": 3, "cfg_scale": 5.5, "width": 64, "height": 96, "batch_size": 2, "n_iter": 1,
                   "checkpoint": None, "clip_stop_at_last_layers": 2, "sd_vae": "tiny-vae.safetensors"},
        "checkpoint": {"name": "tiny-sd1.safetensors", "short_hash": "abcdef1234"},
        "request": {"prompt": "a lighthouse <lora:ink:0.7>", "batch_size": 2},
    }
    put(s3_client, bucket, f"out/{job_id}/params.json", json.dumps(params).encode())
    return images


def test_send_to_img2img_from_job(sdctl, s3_client, s3_bucket, stubbed):  # noqa: F811
    sm_stub, rt_stub, clients = stubbed
    images = source_job(s3_client, s3_bucket)
    expect_invoke(sm_stub, rt_stub, "i-2")
    result = sdctl("--output", f"s3://{s3_bucket}/out/", "img2img", "--from-job", "src:1", "--steps", "7",
                   "--denoising-strength", "0.5", "--endpoint", "sd-async", "--id", "i-2", clients=clients)
    assert result.exit_code == 0, result.output
    payload = input_body(s3_client, s3_bucket, "i-2")["payload"]
    assert [base64.b64decode(b) for b in payload.pop("init_images")] == [images[1]]
    # the job's parameters are the defaults, the seed is image 1's, and --steps overrides
    assert payload == {"prompt": "a lighthouse <lora:ink:0.7>", "negative_prompt": "blurry", "sampler_name": "Euler a",
                       "scheduler": "Automatic", "steps": 7, "cfg_scale": 5.5, "width": 64, "height": 96, "seed": 101,
                       "denoising_strength": 0.5,
                       "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors", "sd_vae": "tiny-vae.safetensors",
                                             "CLIP_stop_at_last_layers": 2}}

    expect_invoke(sm_stub, rt_stub, "i-3")
    result = sdctl("--output", f"s3://{s3_bucket}/out/", "img2img", "--from-job", "src", "-p", "a castle", "--seed", "-1",
                   "--lora", "ink:0.2", "--endpoint", "sd-async", "--id", "i-3", clients=clients)
    assert result.exit_code == 0, result.output
    payload = input_body(s3_client, s3_bucket, "i-3")["payload"]
    assert base64.b64decode(payload["init_images"][0]) == images[0]
    assert payload["prompt"] == "a castle <lora:ink:0.2>" and payload["seed"] == -1 and payload["steps"] == 3


@pytest.mark.parametrize("args, code, words", [
    (["--from-job", "nope"], 4, "job nope not found"),
    (["--from-job", "src:2"], 4, "has no image 2"),
    (["--from-job", "src:x"], 2, "JOB or JOB:n"),
    ([], 2, "needs an init image"),
    (["--init-image", "missing.png"], 2, "no such file"),
    (["--init-image", "notes.txt"], 2, "not a PNG"),
    (["--init-image", "init.png", "--resize-mode", "9"], 2, "--resize-mode"),
    (["--init-image", "init.png", "--mask-blur", "4"], 2, "only apply with --mask"),
])
def test_errors_upload_nothing(sdctl, s3_client, s3_bucket, stubbed, tmp_path, monkeypatch, args, code, words):  # noqa: F811
    _sm, _rt, clients = stubbed
    source_job(s3_client, s3_bucket)
    before = keys(s3_client, s3_bucket)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "init.png").write_bytes(png("red"))
    (tmp_path / "notes.txt").write_text("not an image")
    result = sdctl("--output", f"s3://{s3_bucket}/out/", "img2img", *args, "--endpoint", "sd-async", clients=clients)
    assert result.exit_code == code, result.output
    assert words in result.output
    assert keys(s3_client, s3_bucket) == before  # nothing recorded, nothing uploaded (no SageMaker call either)


def test_from_job_of_a_failed_job(sdctl, s3_client, s3_bucket, stubbed):  # noqa: F811
    _sm, _rt, clients = stubbed
    from tests.client.conftest import created_at

    write_job(s3_client, s3_bucket, "out/", "broken", created_at(2), "txt2img", "failed", error="boom")
    result = sdctl("--output", f"s3://{s3_bucket}/out/", "img2img", "--from-job", "broken", "--endpoint", "sd-async", clients=clients)
    assert result.exit_code == 4 and "is failed" in result.output


def test_from_an_img2img_job_keeps_its_strength_and_resize_mode(sdctl, s3_client, s3_bucket, stubbed):  # noqa: F811
    sm_stub, rt_stub, clients = stubbed
    source_job(s3_client, s3_bucket, "src2")
    doc = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="out/src2/params.json")["Body"].read())
    doc["task"] = "img2img"
    doc["params"].update(denoising_strength=0.3, resize_mode=2, init_image={"sha256": "0" * 64, "bytes": 10})
    put(s3_client, s3_bucket, "out/src2/params.json", json.dumps(doc).encode())
    expect_invoke(sm_stub, rt_stub, "i-4")
    result = sdctl("--output", f"s3://{s3_bucket}/out/", "img2img", "--from-job", "src2", "--endpoint", "sd-async", "--id", "i-4",
                   clients=clients)
    assert result.exit_code == 0, result.output
    payload = input_body(s3_client, s3_bucket, "i-4")["payload"]
    assert payload["denoising_strength"] == 0.3 and payload["resize_mode"] == 2
    # a txt2img source has no strength of its own: the server's default applies
    expect_invoke(sm_stub, rt_stub, "i-5")
    assert sdctl("--output", f"s3://{s3_bucket}/out/", "img2img", "--from-job", "src", "--endpoint", "sd-async", "--id", "i-5",
                 clients=clients).exit_code == 4  # "src" was not written in this test's bucket
    source_job(s3_client, s3_bucket, "src")
    assert sdctl("--output", f"s3://{s3_bucket}/out/", "img2img", "--from-job", "src", "--endpoint", "sd-async", "--id", "i-5",
                 clients=clients).exit_code == 0
    assert "denoising_strength" not in input_body(s3_client, s3_bucket, "i-5")["payload"]


def test_one_init_image_per_request(sdctl, tmp_path):
    (tmp_path / "a.png").write_bytes(png("red"))
    result = sdctl("img2img", "-i", tmp_path / "a.png", "-i", tmp_path / "a.png", "--local", "http://127.0.0.1:9")
    assert result.exit_code == 2 and "one init image per request" in result.output
