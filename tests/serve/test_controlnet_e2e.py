"""Multi-ControlNet through the real server: A1111 extension units in, images + infotext + records out."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.infotext import parse_infotext
from pipelines.tiny import build_tiny_pipeline
from tests.support.controlnet_files import write_original_controlnet
from tests.support.model_fixtures import copy_checkpoint
from tests.support.server import running_server

SIZE = 64
BASE = {"prompt": "a photo of a cat", "negative_prompt": "", "steps": 2, "width": SIZE, "height": SIZE, "seed": 5, "cfg_scale": 7,
        "sampler_name": "Euler"}


def png_b64(seed: int = 0, size=(96, 80)) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def cn_server(tiny_model_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("cnstore")
    for stem in ("tiny-sd1", "tiny-sdxl"):
        copy_checkpoint(tiny_model_store, stem, root / "Stable-diffusion")
    unet = build_tiny_pipeline("sd1", seed=0).unet
    write_original_controlnet(root / "ControlNet", "cn-a", unet, seed=1)
    write_original_controlnet(root / "ControlNet" / "sub", "cn-b", unet, seed=2, suffix=".pth")
    write_original_controlnet(root / "ControlNet", "cn-xl", build_tiny_pipeline("sdxl", seed=0).unet, seed=3)
    (root / "annotators").mkdir()
    with running_server(root, tmp_path_factory.mktemp("cnserver"), MAX_CONTROLNET_UNITS="3") as proc:
        yield proc


def unit(**kw) -> dict:
    return {"enabled": True, "module": "canny", "model": "cn-a", "image": png_b64(), "weight": 1.0, **kw}


def run(server, units, **changes):
    body = {**BASE, **changes, "alwayson_scripts": {"controlnet": {"args": units}}}
    return httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=180)


def images(r) -> list[np.ndarray]:
    assert r.status_code == 200, r.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"), dtype=np.int16) for b in r.json()["images"]]


@pytest.fixture(scope="module")
def base(cn_server):
    return images(run(cn_server, []))


def test_one_unit_changes_the_image_records_it_and_returns_its_map(cn_server, base):
    r = run(cn_server, [unit(processor_res=64, threshold_a=50, threshold_b=150)])
    out = images(r)
    assert len(out) == 2 and out[1].shape == (SIZE, SIZE, 3)  # the detected map follows the image, as the extension does
    assert np.abs(out[0] - base[0]).max() > 10
    assert set(np.unique(out[1])) <= {0, 255}  # a canny map
    info = json.loads(r.json()["info"])
    text = info["infotexts"][0]
    value = parse_infotext(text)["ControlNet 0"]
    assert value.startswith("Module: canny, Model: cn-a [") and "Weight: 1.0, Resize Mode: Crop and Resize" in value
    assert "Processor Res: 64, Threshold A: 50.0, Threshold B: 150.0, Guidance Start: 0.0, Guidance End: 1.0" in value
    assert "Control Mode: Balanced" in value
    job_dir = cn_server.output / r.json()["job_id"]
    params = json.loads((job_dir / "params.json").read_text())
    [rec] = params["networks"]["controlnet"]
    assert rec["module"] == "canny" and len(rec["model_file"]["sha256"]) == 64 and rec["image"]["bytes"] > 0
    assert (job_dir / rec["detected_map"]).is_file()
    cache = json.loads((job_dir / "job.json").read_text())["cache"]
    assert [e["label"] for e in cache["controlnets"]] == ["ControlNet/cn-a"]
    assert "ControlNet/cn-a" in cache["tiers"]["ram"]["models"]  # the same byte budget as the checkpoints
    listed = httpx.get(cn_server.url + "/cache", timeout=30).json()
    assert "ControlNet/cn-a" in [e["name"] for e in listed["memory"]["tiers"]["ram"]["entries"]]


def test_weight_zero_equals_no_controlnet_and_map_can_be_off(cn_server, base):
    zero = images(run(cn_server, [unit(weight=0.0, save_detected_map=False)]))
    assert len(zero) == 1 and np.array_equal(zero[0], base[0])


def test_two_units_modes_and_ranges(cn_server):
    one = images(run(cn_server, [unit(save_detected_map=False)]))[0]
    two = images(run(cn_server, [unit(save_detected_map=False),
                                 unit(model="cn-b", module="invert", image=png_b64(3), weight=0.8, guidance_end=0.5,
                                      save_detected_map=False)]))[0]
    assert np.abs(two - one).max() > 3
    modes = [one] + [images(run(cn_server, [unit(control_mode=m, save_detected_map=False)]))[0] for m in (1, 2)]
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert np.abs(modes[i] - modes[j]).max() > 3, (i, j)


@pytest.mark.parametrize("units, status, field", [
    ([unit(module="not_a_preprocessor")], 422, "args[0].module"),
    ([unit(), unit(model="no-such-controlnet")], 404, "args[1].model"),
    ([unit(image=base64.b64encode(b"garbage bytes").decode())], 422, "args[0].image"),
    ([unit(guidance_start=0.9, guidance_end=0.1)], 422, "args[0].guidance_start"),
    ([unit(), unit(), unit(), unit()], 422, "args[3]"),
    ([unit(image=None)], 422, "args[0].image"),
])
def test_bad_units(cn_server, units, status, field):
    r = run(cn_server, units)
    assert r.status_code == status, r.text
    assert f"alwayson_scripts.controlnet.{field}" in r.text


def test_decompression_bomb_is_refused(cn_server):
    from tests.pipelines.test_control_units import bomb_png

    r = run(cn_server, [unit(image=bomb_png())])
    assert r.status_code == 422 and "args[0].image" in r.text


def test_sdxl_controlnet_on_sd1_checkpoint_names_both(cn_server):
    r = run(cn_server, [unit(model="cn-xl")])
    assert r.status_code == 422, r.text
    assert "SDXL" in r.text and "SD1" in r.text and "args[0].model" in r.text


def test_img2img_unit_without_image_uses_the_init_image(cn_server):
    body = {**BASE, "init_images": [png_b64(7, size=(SIZE, SIZE))], "denoising_strength": 0.6,
            "alwayson_scripts": {"controlnet": {"args": [unit(image=None, module="none")]}}}
    r = httpx.post(cn_server.url + "/sdapi/v1/img2img", json=body, timeout=180)
    out = images(r)
    assert len(out) == 2 and np.array_equal(out[1], np.asarray(Image.open(io.BytesIO(base64.b64decode(body["init_images"][0]))), dtype=np.int16))
    params = json.loads((cn_server.output / r.json()["job_id"] / "params.json").read_text())
    assert params["networks"]["controlnet"][0]["image_source"] == "init_images"


def test_worker_side_units_from_the_store(tiny_model_store, tmp_path):
    """serve.control without the HTTP layer: store names (diffusers folder too), preprocessing, records, maps."""
    import torch

    from model_cache.hashes import HashCache
    from model_cache.store import LocalStore
    from pipelines.checkpoint import load_pipeline
    from pipelines.control_units import parse_units
    from serve.control import ControlNets
    from tests.support.controlnet_files import write_diffusers_controlnet

    root = tmp_path / "store"
    loaded = load_pipeline(tiny_model_store / "Stable-diffusion" / "tiny-sd1.safetensors")
    write_original_controlnet(root / "ControlNet", "cn-a", loaded.pipe.unet, seed=1)
    write_diffusers_controlnet(root / "ControlNet" / "cn-diffusers", loaded.pipe.unet, seed=2)
    units = parse_units({"args": [unit(model="cn-a [00000000]", pixel_perfect=True),
                                  unit(model="cn-diffusers", module="invert", resize_mode="Resize and Fill", weight=0.5)]},
                        max_units=10, max_pixels=10**6, has_init_image=False, warnings=[])
    from pipelines.residency import PipelineCache

    models = PipelineCache(device="cpu", ram_budget=1 << 30, vram_budget=None, modules_of=lambda v: [v.model])
    nets = ControlNets(LocalStore(root), HashCache(tmp_path / "cache"), device="cpu", dtype=torch.float32, models=models)
    prepared = nets.prepare(units, pipe=loaded.pipe, family="sd1", checkpoint="tiny-sd1", width=SIZE, height=SIZE, seed=1)
    assert [u.hint.shape for u in prepared.units] == [(1, 3, SIZE, SIZE)] * 2
    assert [r["model_file"]["layout"] for r in prepared.records] == ["original", "diffusers"]
    assert prepared.records[0]["processor_res"] == 64  # pixel perfect: 96x80 cropped onto 64x64 → short side 80 x 0.8
    assert "Processor Res" not in prepared.infotext["ControlNet 1"]  # invert has no resolution slider
    assert [name for name, _ in prepared.maps] == ["controlnet-0-canny.png", "controlnet-1-invert.png"]
    assert [e["source"] for e in nets.events] == ["load", "load"]
    nets.release()
    nets.prepare(units, pipe=loaded.pipe, family="sd1", checkpoint="tiny-sd1", width=SIZE, height=SIZE, seed=1)
    assert nets.loads == 2 and [e["source"] for e in nets.events] == ["ram", "ram"]  # the second job reuses both models


def test_controlnets_live_under_the_byte_budget(tiny_model_store, tmp_path):
    """ControlNets are evicted LRU-first when the RAM budget is full, never while the job uses them."""
    import torch

    from model_cache.hashes import HashCache
    from model_cache.store import LocalStore
    from pipelines.checkpoint import load_pipeline
    from pipelines.control_units import parse_units
    from pipelines.memory import module_bytes
    from pipelines.residency import PipelineCache
    from serve.control import ControlNets

    root = tmp_path / "store"
    loaded = load_pipeline(tiny_model_store / "Stable-diffusion" / "tiny-sd1.safetensors")
    for n, name in enumerate(("cn-a", "cn-b", "cn-c")):
        write_original_controlnet(root / "ControlNet", name, loaded.pipe.unet, seed=n + 1)

    def units(*names):
        return parse_units({"args": [unit(model=name, module="invert") for name in names]},
                           max_units=10, max_pixels=10**6, has_init_image=False, warnings=[])

    probe = ControlNets(LocalStore(root), HashCache(tmp_path / "cache"), device="cpu", dtype=torch.float32,
                        models=PipelineCache(device="cpu", ram_budget=1 << 30, vram_budget=None, modules_of=lambda v: [v.model]))
    prepared = probe.prepare(units("cn-a"), pipe=loaded.pipe, family="sd1", checkpoint="tiny-sd1", width=SIZE, height=SIZE, seed=1)
    one = module_bytes(prepared.units[0].controlnet)
    models = PipelineCache(device="cpu", ram_budget=int(one * 2.5), vram_budget=None, modules_of=lambda v: [v.model])
    nets = ControlNets(LocalStore(root), HashCache(tmp_path / "cache"), device="cpu", dtype=torch.float32, models=models)

    def job(*names):
        nets.release()
        nets.prepare(units(*names), pipe=loaded.pipe, family="sd1", checkpoint="tiny-sd1", width=SIZE, height=SIZE, seed=1)
        return [e["source"] for e in nets.events], [x["name"] for e in nets.events for x in e["evicted"]]

    assert job("cn-a", "cn-b") == (["load", "load"], [])
    assert job("cn-a") == (["ram"], [])  # cn-b is now the least recently used
    assert job("cn-c") == (["load"], ["ControlNet/cn-b"])
    assert models.residency.used("ram") <= int(one * 2.5)
    # three in one job exceed the budget: cn-b's load evicts the unpinned cn-c, which then loads again;
    # all three stay while the job runs (pinned), the overflow goes after it
    assert job("cn-a", "cn-b", "cn-c") == (["ram", "load", "load"], ["ControlNet/cn-c"])
    assert len(models.residency.keys("ram")) == 3
    job()
    models.refresh(next(iter(models.residency.keys("ram"))))
    assert len(models.residency.keys("ram")) == 2


def test_unit_image_by_location_in_the_envelope(cn_server):
    """A unit's image named by file:// inside the OUTPUT folder (an earlier job's detected map) works like base64."""
    data = base64.b64decode(png_b64(4))
    (cn_server.output / "shared").mkdir(parents=True, exist_ok=True)
    (cn_server.output / "shared" / "pose.png").write_bytes(data)
    uri = f"file://{cn_server.output.resolve()}/shared/pose.png"
    by_b64 = images(run(cn_server, [unit(image=png_b64(4), save_detected_map=False)]))[0]
    body = {"task": "txt2img", "payload": {**BASE, "alwayson_scripts": {"controlnet": {"args": [unit(image=uri, save_detected_map=False)]}}}}
    r = httpx.post(cn_server.url + "/invocations", json=body, timeout=180)
    assert np.array_equal(images(r)[0], by_b64)
    params = json.loads((cn_server.output / r.json()["job_id"] / "params.json").read_text())
    assert params["image_sources"] == {"payload.alwayson_scripts.controlnet.args[0].image": uri}
    escape = {**body, "payload": {**body["payload"], "alwayson_scripts": {"controlnet": {"args": [unit(image="file:///etc/passwd")]}}}}
    refused = httpx.post(cn_server.url + "/invocations", json=escape, timeout=60)
    assert refused.status_code == 403 and "args[0].image" in refused.text
