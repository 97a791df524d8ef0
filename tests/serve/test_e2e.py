"""End to end through a real server process: payload → worker → PNG + records."""

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

SMALL = {"prompt": "a lighthouse", "negative_prompt": "blurry", "steps": 2, "width": 64, "height": 64, "cfg_scale": 5}


def post(server, body, path="/invocations", **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers={"Content-Type": "application/json"}, timeout=120, **kw)


def pixels(b64: str) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes()


def test_txt2img_answers_in_a1111_shape_and_writes_outputs(server):
    r = post(server, {**SMALL, "seed": 42})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 1 and body["job_id"]
    info = json.loads(body["info"])
    assert info["all_seeds"] == [42] and info["sd_model_name"] == "tiny-sd1"
    assert body["parameters"]["prompt"] == "a lighthouse"
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.size == (64, 64)
    text = image.info["parameters"]
    assert text.startswith("a lighthouse\nNegative prompt: blurry\nSteps: 2, ")
    assert "Seed: 42, Size: 64x64, Model hash: " in text and "Model: tiny-sd1" in text
    job_dir = server.output / body["job_id"]
    record = json.loads((job_dir / "job.json").read_text())
    assert record["status"] == "succeed" and record["error"] is None
    assert set(record["timings"]) == {"fetch", "load", "generate", "encode", "upload"}
    params = json.loads((job_dir / "params.json").read_text())
    assert params["params"]["seeds"] == [42]
    assert len(params["checkpoint"]["sha256"]) == 64 and params["checkpoint"]["short_hash"] == params["checkpoint"]["sha256"][:10]
    assert (job_dir / "image-0.png").read_bytes() == base64.b64decode(body["images"][0])


def test_same_seed_same_image_other_seed_other_image(server):
    a = post(server, {**SMALL, "seed": 7}).json()["images"][0]
    b = post(server, {**SMALL, "seed": 7}).json()["images"][0]
    c = post(server, {**SMALL, "seed": 8}).json()["images"][0]
    assert pixels(a) == pixels(b)
    assert pixels(a) != pixels(c)


def test_batch_and_n_iter_count_and_seeds(server):
    body = post(server, {**SMALL, "seed": 1000, "batch_size": 2, "n_iter": 2}).json()
    assert len(body["images"]) == 4
    info = json.loads(body["info"])
    assert info["all_seeds"] == [1000, 1001, 1002, 1003]
    seeds = [Image.open(io.BytesIO(base64.b64decode(i))).info["parameters"] for i in body["images"]]
    assert [("Seed: %d," % s) in t for s, t in zip(info["all_seeds"], seeds)] == [True] * 4
    # A1111: image i of a batch is the image of seed+i on its own (same noise; batched
    # float math may move a pixel value by one step)
    alone = np.frombuffer(pixels(post(server, {**SMALL, "seed": 1003}).json()["images"][0]), np.uint8).astype(int)
    in_batch = np.frombuffer(pixels(body["images"][3]), np.uint8).astype(int)
    assert np.abs(alone - in_batch).max() <= 2
    other = np.frombuffer(pixels(body["images"][2]), np.uint8).astype(int)
    assert np.abs(alone - other).max() > 10


def test_sdapi_route_and_bare_envelope(server):
    r = post(server, {**SMALL, "seed": 3}, path="/sdapi/v1/txt2img")
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    r = post(server, {"task": "txt2img", "id": "my-job-1", "payload": {**SMALL, "seed": 3}, "output": {"inline": False}})
    assert r.status_code == 200, r.text
    # not inline: the answer is the small job record (what SageMaker async stores)
    assert r.json()["id"] == "my-job-1" and r.json()["status"] == "succeed" and "images" in r.json()
    assert (server.output / "my-job-1" / "image-0.png").exists()


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{oops", 400, "not valid JSON"),
        ({**SMALL, "width": 500}, 422, "multiple of 8"),
        ({**SMALL, "sampler_name": "Bogus"}, 422, "DPM++ 2M"),
        ({**SMALL, "override_settings": {"sd_model_checkpoint": "nope"}}, 404, "nope"),
        ({**SMALL, "override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, 422, ".."),
        ({**SMALL, "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, 422, "hr_upscaler"),
    ],
)
def test_bad_input_gets_clear_errors_and_server_keeps_serving(server, body, status, words):
    r = post(server, body)
    assert r.status_code == status, r.text
    err = r.json()
    assert words in err["detail"]
    assert "Traceback" not in r.text
    assert post(server, {**SMALL, "seed": 1}).status_code == 200


def test_unknown_model_404_says_where_it_looked(server):
    r = post(server, {**SMALL, "override_settings": {"sd_model_checkpoint": "missing-model"}})
    assert r.status_code == 404
    assert "missing-model" in r.json()["detail"] and "Stable-diffusion" in r.json()["detail"]
    record = json.loads((server.output / r.json()["job_id"] / "job.json").read_text())
    assert record["status"] == "failed" and "missing-model" in record["error"]


def test_ping_answers_fast_while_generating(server):
    slow = {**SMALL, "steps": 60, "width": 128, "height": 128, "batch_size": 2, "seed": 5}
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", post(server, slow)))
    t.start()
    latencies, states = [], set()
    deadline = time.monotonic() + 60
    while t.is_alive() and time.monotonic() < deadline:
        start = time.perf_counter()
        r = httpx.get(server.url + "/ping", timeout=2)
        latencies.append(time.perf_counter() - start)
        states.add(r.json()["status"])
        assert r.status_code == 200
        time.sleep(0.05)
    t.join()
    assert result["r"].status_code == 200
    assert "busy" in states
    assert max(latencies) < 1.0, latencies


def test_checkpoint_switch_by_name_with_hash_suffix(server):
    a = post(server, {**SMALL, "seed": 9, "override_settings": {"sd_model_checkpoint": "tiny-sd1-b.safetensors [0123456789]"}}).json()
    assert json.loads(a["info"])["sd_model_name"] == "tiny-sd1-b"
    b = post(server, {**SMALL, "seed": 9}).json()
    assert pixels(a["images"][0]) != pixels(b["images"][0])
    x = post(server, {**SMALL, "seed": 9, "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}})
    assert x.status_code == 200, x.text
    assert json.loads(x.json()["info"])["sd_model_name"] == "tiny-sdxl"
