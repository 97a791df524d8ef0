"""Real A1111 clients against our server: webuiapi (the WebUI API client) and sd-parsers (PNG Info)."""

import base64
import io

import httpx
import pytest
import webuiapi
from PIL import Image
from sd_parsers import ParserManager


@pytest.fixture(scope="module")
def api(server):
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=2)


def test_webuiapi_txt2img(api):
    result = api.txt2img(prompt="a red cat", negative_prompt="dog", seed=77, width=64, height=64, cfg_scale=6, batch_size=2)
    assert len(result.images) == 2 and all(isinstance(i, Image.Image) for i in result.images)
    assert result.info["all_seeds"] == [77, 78]
    assert result.info["sampler_name"] == "Euler a"
    assert result.parameters["prompt"] == "a red cat"


def test_webuiapi_errors_surface(api):
    with pytest.raises(RuntimeError, match="multiple of 8"):
        api.txt2img(prompt="x", width=65, height=64)


def test_sd_parsers_reads_our_png(server):
    body = {"prompt": "a (blue:1.1) bird", "negative_prompt": "lowres, text", "seed": 5, "steps": 3, "width": 64, "height": 64,
            "cfg_scale": 4.5, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}
    r = httpx.post(server.url + "/invocations", json=body, timeout=120)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    buffer = io.BytesIO(base64.b64decode(r.json()["images"][0]))
    parsed = ParserManager().parse(buffer)
    assert parsed is not None and parsed.generator.value == "AUTOMATIC1111"
    assert [p.value for p in parsed.prompts] == ["a (blue:1.1) bird"]
    assert [p.value for p in parsed.negative_prompts] == ["lowres, text"]
    (sampler,) = parsed.samplers
    assert sampler.name == "DPM++ 2M"
    assert (sampler.parameters["steps"], sampler.parameters["seed"], sampler.parameters["cfg_scale"]) == ("3", "5", "4.5")
    assert sampler.parameters["scheduler"] == "Karras"
    assert sampler.model.name == "tiny-sd1" and len(sampler.model.hash) == 10
    assert image.size == (64, 64)


def test_webuiapi_img2img(api):
    start = Image.new("RGB", (80, 64), (200, 30, 30))
    result = api.img2img(images=[start], prompt="a red cat", seed=5, width=64, height=64, denoising_strength=0.4, steps=5)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert result.info["denoising_strength"] == 0.4 and result.info["all_seeds"] == [5]
    assert "Denoising strength: 0.4" in result.info["infotexts"][0]
