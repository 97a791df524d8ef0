"""img2img and hires fix through the real server: routes, bare body detection, records without image bytes, infotext, clear errors."""

import base64
import io
import json

import httpx
import numpy as np
from PIL import Image

from pipelines.infotext import parse_infotext


def b64_image(size=(64, 64), color=(20, 120, 220)):
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def decode(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_img2img_route_records_and_infotext(server):
    body = {"prompt": "a blue bird", "init_images": [b64_image((96, 64))], "denoising_strength": 0.5, "steps": 6, "seed": 9,
            "width": 64, "height": 64, "resize_mode": 1}
    r = httpx.post(server.url + "/sdapi/v1/img2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    image = decode(answer["images"][0])
    assert image.size == (64, 64)
    fields = parse_infotext(image.info["parameters"])
    assert fields["Denoising strength"] == "0.5" and fields["Seed"] == "9" and fields["Steps"] == "6"
    assert answer["parameters"]["init_images"] == ["<image 0>"]
    job = answer["job"]
    assert job["task"] == "img2img" and job["status"] == "succeed"
    params = json.loads((server.output / answer["job_id"] / "params.json").read_text())
    assert params["task"] == "img2img" and len(params["params"]["init_image"]["sha256"]) == 64
    assert len(json.dumps(params["request"])) < 2000, "the recorded request must not carry the image"


def test_bare_invocations_body_with_init_images_runs_img2img(server):
    body = {"prompt": "x", "init_images": [b64_image()], "denoising_strength": 0.3, "steps": 4, "seed": 3, "width": 64, "height": 64}
    r = httpx.post(server.url + "/invocations", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["job"]["task"] == "img2img"
    # the same request twice gives the same image (seeded noise, deterministic init latents)
    again = httpx.post(server.url + "/invocations", json=body, timeout=120).json()
    assert np.array_equal(np.asarray(decode(r.json()["images"][0])), np.asarray(decode(again["images"][0])))


def test_img2img_errors_name_the_field(server):
    r = httpx.post(server.url + "/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["%%%"]}, timeout=30)
    assert r.status_code == 422 and r.json()["field"] == "init_images[0]"
    r = httpx.post(server.url + "/invocations", json={"task": "img2img", "payload": {"prompt": "x"}}, timeout=30)
    assert r.status_code == 422 and r.json()["field"] == "payload.init_images"


def test_inpainting_through_the_server(server):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    body = {"prompt": "x", "init_images": [b64_image()], "mask": base64.b64encode(out.getvalue()).decode(), "mask_blur": 2,
            "inpaint_full_res": True, "inpaint_full_res_padding": 4, "denoising_strength": 0.8, "steps": 4, "seed": 1, "width": 64, "height": 64}
    r = httpx.post(server.url + "/sdapi/v1/img2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    image = decode(r.json()["images"][0])
    fields = parse_infotext(image.info["parameters"])
    assert (fields["Mask blur"], fields["Inpaint area"], fields["Masked area padding"]) == ("2", "Only masked", "4")
    pixels = np.asarray(image.convert("RGB"))
    assert pixels[2, 2].tolist() == [20, 120, 220], "outside the mask the init image is kept"


def test_hires_fix_through_the_server(server):
    body = {"prompt": "a cat", "steps": 3, "seed": 4, "width": 64, "height": 64, "enable_hr": True, "hr_scale": 1.5,
            "hr_second_pass_steps": 2, "denoising_strength": 0.6, "hr_upscaler": "Latent (bicubic)", "hr_sampler_name": "DPM++ 2M"}
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    image = decode(r.json()["images"][0])
    assert image.size == (96, 96)
    fields = parse_infotext(image.info["parameters"])
    assert (fields["Size-1"], fields["Size-2"], fields["Denoising strength"]) == ("64", "64", "0.6")
    assert (fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"], fields["Hires sampler"]) == ("1.5", "2", "Latent (bicubic)", "DPM++ 2M")
