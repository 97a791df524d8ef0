"""img2img requests: init image and mask decoded and checked in the HTTP process, A1111 defaults, clear 422s."""

import base64
import hashlib
import io
import json

import pytest
from PIL import Image

from pipelines.errors import InvalidParameter
from pipelines.image_input import from_png_bytes
from pipelines.params import Img2ImgParams
from serve.requests import build_job
from serve.settings import Settings


@pytest.fixture
def settings(tmp_path):
    return Settings(model_store=str(tmp_path), output=str(tmp_path / "out"), max_steps=60, max_side=1024, max_pixels=512 * 512)


def b64(size=(96, 80), mode="RGB", color=(10, 200, 30), fmt="PNG"):
    out = io.BytesIO()
    Image.new(mode, size, color if mode != "L" else 255).save(out, format=fmt)
    return base64.b64encode(out.getvalue()).decode()


def invalid(body, settings, **kw):
    with pytest.raises(InvalidParameter) as info:
        build_job(body, settings, **kw)
    return info.value


def test_bare_body_with_init_images_is_img2img_with_a1111_defaults(settings):
    job = build_job({"prompt": "a cat", "init_images": [b64()], "steps": 10, "width": 64, "height": 64}, settings)
    p = job.params
    assert job.task == "img2img" and isinstance(p, Img2ImgParams)
    assert (p.denoising_strength, p.resize_mode, p.mask, p.initial_noise_multiplier) == (0.75, 0, None, 1.0)
    assert from_png_bytes(p.init_image).size == (96, 80)
    # the echoed parameters and the recorded request carry no image bytes
    assert job.parameters["init_images"] == ["<image 0>"]
    recorded = json.dumps(job.payload)
    assert len(recorded) < 1000 and "characters, sha256" in recorded
    assert p.to_dict()["init_image"]["sha256"] == hashlib.sha256(p.init_image).hexdigest()


def test_envelope_and_route_tasks(settings):
    body = {"task": "img2img", "payload": {"init_images": ["data:image/png;base64," + b64()], "denoising_strength": 0.3, "resize_mode": "Crop and resize"}}
    job = build_job(body, settings)
    assert job.params.denoising_strength == 0.3 and job.params.resize_mode == 1
    job = build_job({"init_images": [b64()], "resize_mode": 2}, settings, task="img2img")
    assert job.params.resize_mode == 2
    err = invalid({"task": "txt2img", "payload": {"prompt": "x"}}, settings, task="img2img")
    assert err.field == "task"
    # the txt2img route ignores init_images as A1111 does: unknown field, reported
    job = build_job({"prompt": "x", "init_images": [b64()]}, settings, task="txt2img")
    assert job.task == "txt2img" and "init_images" in json.dumps(job.warnings)


@pytest.mark.parametrize(
    "payload, field, words",
    [
        ({}, "init_images", "one init image"),
        ({"init_images": []}, "init_images", "one init image"),
        ({"init_images": [b64(), b64()]}, "init_images", "one init image per request"),
        ({"init_images": ["not base64 !!"]}, "init_images[0]", "not valid base64"),
        ({"init_images": [base64.b64encode(b"GIF89a garbage").decode()]}, "init_images[0]", "not a decodable image"),
        ({"init_images": [12]}, "init_images[0]", "base64"),
        ({"init_images": [b64(size=(2048, 2048))]}, "init_images[0]", "more than the limit"),
        ({"init_images": [b64()], "denoising_strength": 1.5}, "denoising_strength", "less than or equal to 1"),
        ({"init_images": [b64()], "resize_mode": 7}, "resize_mode", "unknown resize mode"),
        ({"init_images": [b64()], "resize_mode": "Zoom"}, "resize_mode", "unknown resize mode"),
        ({"init_images": [b64(size=(90, 80))], "resize_mode": 3}, "resize_mode", "multiples of 8"),
        ({"init_images": [b64()], "mask": b64(size=(10, 10), mode="L")}, "mask", "the mask is 10x10"),
        ({"init_images": [b64()], "mask": "@@@"}, "mask", "not valid base64"),
        ({"init_images": [b64()], "inpainting_fill": 5}, "inpainting_fill", "less than or equal to 3"),
    ],
)
def test_bad_img2img_input_is_a_422_naming_the_field(settings, payload, field, words):
    err = invalid({"task": "img2img", "payload": {"prompt": "x", **payload}}, settings)
    assert err.field == f"payload.{field}", err.message
    assert words in err.message, err.message


def test_decompression_bomb_is_refused_from_the_header(settings):
    # a 1-bit PNG of 20000x20000 is a few kB; its pixel count is what must be refused, before decoding
    out = io.BytesIO()
    Image.new("1", (20000, 20000)).save(out, format="PNG")
    assert len(out.getvalue()) < 100_000
    err = invalid({"init_images": [base64.b64encode(out.getvalue()).decode()]}, settings)
    assert err.field == "init_images[0]" and "pixels" in err.message


def test_mask_options_resolve(settings):
    job = build_job(
        {"init_images": [b64()], "mask": b64(mode="L"), "mask_blur": 8, "inpainting_mask_invert": 1, "inpainting_fill": 2, "inpaint_full_res": False},
        settings,
    )
    p = job.params
    assert from_png_bytes(p.mask).size == (96, 80)
    assert (p.mask_blur, p.inpainting_mask_invert, p.inpainting_fill, p.inpaint_full_res) == (8, True, 2, False)
    assert job.parameters["mask"] == "<mask>"


def test_mask_options_without_a_mask_are_reported(settings):
    job = build_job({"init_images": [b64()], "mask_blur": 8}, settings)
    assert any("mask_blur: no effect without a mask" in w for w in job.warnings)
