"""`sdctl txt2img|img2img --local` against one real server process over the tiny model store, `get`/`show`, "send to img2img"."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from client.jobs import png_text
from tests.support.server import running_server


@pytest.fixture(scope="module")
def server(tiny_model_store, tmp_path_factory):
    """The server over a store with the tiny SD1 checkpoint and one tiny ControlNet (``cn-a``)."""
    import shutil

    from pipelines.tiny import build_tiny_pipeline
    from tests.support.controlnet_files import write_original_controlnet

    store = tmp_path_factory.mktemp("store")
    (store / "Stable-diffusion").mkdir()
    for name in ("tiny-sd1.safetensors", "tiny-sd1.config"):
        src = tiny_model_store / "Stable-diffusion" / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, store / "Stable-diffusion" / name)
    write_original_controlnet(store / "ControlNet", "cn-a", build_tiny_pipeline("sd1", seed=0).unet, seed=1)
    (store / "annotators").mkdir()
    with running_server(store, tmp_path_factory.mktemp("server")) as proc:
        yield proc


def test_txt2img_local_then_get_and_show(sdctl, server, tmp_path):
    result = sdctl("txt2img", "--local", server.url, "--prompt", "a lighthouse", "--negative", "blurry", "--steps", "2",
                   "--width", "64", "--height", "64", "--seed", "42", "--batch", "2", "--sampler", "Euler a",
                   "--checkpoint", "tiny-sd1", "--id", "cli-job-1", "-o", tmp_path / "imgs")
    assert result.exit_code == 0, result.output + server.log_tail()
    assert result.stdout.strip() == "cli-job-1"
    images = sorted(p.name for p in (tmp_path / "imgs").glob("image-*.png"))
    assert images == ["image-0.png", "image-1.png"]
    text = png_text((tmp_path / "imgs" / "image-0.png").read_bytes())
    assert text.startswith("a lighthouse\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a") and "Seed: 42" in text

    result = sdctl("--output", server.output, "get", "cli-job-1", "-o", tmp_path / "dl")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["image-0.png", "image-1.png", "job.json", "params.json"]
    assert (tmp_path / "dl" / "image-1.png").read_bytes() == (tmp_path / "imgs" / "image-1.png").read_bytes()
    assert json.loads((tmp_path / "dl" / "job.json").read_text())["status"] == "succeed"

    result = sdctl("--output", server.output, "show", "cli-job-1")
    assert result.exit_code == 0 and "Seed: 42" in result.stdout and '"status": "succeed"' in result.stdout
    assert sdctl("--output", server.output, "wait", "cli-job-1").exit_code == 0


def test_local_errors_are_actionable(sdctl, server, tmp_path):
    result = sdctl("txt2img", "--local", server.url, "-p", "x", "--width", "65", "-o", tmp_path)
    assert result.exit_code == 2 and "width" in result.output
    result = sdctl("txt2img", "--local", server.url, "-p", "x", "--steps", "2", "--width", "64", "--height", "64",
                   "--checkpoint", "no-such-model", "-o", tmp_path)
    assert result.exit_code == 4 and "no-such-model" in result.output
    result = sdctl("endpoints", "--local", server.url)
    assert result.exit_code == 0 and "InService" in result.stdout


# ---------------------------------------------------------------- img2img
@pytest.fixture(scope="module")
def source(server, tmp_path_factory):
    """A finished 2-image txt2img job made through sdctl: the start of the img2img tests."""
    from typer.testing import CliRunner

    from client.cli import app

    out = tmp_path_factory.mktemp("src")
    result = CliRunner().invoke(app, ["txt2img", "--local", server.url, "-p", "a lighthouse", "--negative", "fog",
                                      "--steps", "2", "--width", "64", "--height", "64", "--seed", "42", "--batch", "2",
                                      "--cfg", "6", "--sampler", "Euler", "--id", "e2e-src", "-o", str(out)])
    assert result.exit_code == 0, result.output + server.log_tail()
    return out


def test_send_to_img2img_equals_the_same_request_by_hand(sdctl, server, source, tmp_path):
    result = sdctl("--output", server.output, "img2img", "--local", server.url, "--from-job", "e2e-src:1",
                   "--denoising-strength", "0.6", "--id", "e2e-from-job", "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output + server.log_tail()
    assert result.stdout.strip() == "e2e-from-job"
    text = png_text((tmp_path / "a" / "image-0.png").read_bytes())
    # image 1's parameters: its prompt, its seed (42 + 1), the source's steps/sampler/cfg/size, and the new strength
    assert text.startswith("a lighthouse\nNegative prompt: fog\nSteps: 2, Sampler: Euler")
    assert "Seed: 43" in text and "CFG scale: 6" in text and "Size: 64x64" in text and "Denoising strength: 0.6" in text
    params = json.loads((server.output / "e2e-from-job" / "params.json").read_text())
    assert params["task"] == "img2img" and params["params"]["denoising_strength"] == 0.6
    assert params["checkpoint"]["name"].startswith("tiny-sd1")

    # the same request spelled out by hand, with image 1 as --init-image, gives the same pixels
    result = sdctl("img2img", "--local", server.url, "--init-image", source / "image-1.png", "-p", "a lighthouse",
                   "--negative", "fog", "--steps", "2", "--sampler", "Euler", "--cfg", "6", "--width", "64", "--height", "64",
                   "--seed", "43", "--checkpoint", params["checkpoint"]["name"], "--denoising-strength", "0.6",
                   "-o", tmp_path / "b")
    assert result.exit_code == 0, result.output
    a, b = (Image.open(io.BytesIO((tmp_path / d / "image-0.png").read_bytes())) for d in ("a", "b"))
    assert a.tobytes() == b.tobytes()
    # and image 0 of the source is a different start: a different result
    result = sdctl("--output", server.output, "img2img", "--local", server.url, "--from-job", "e2e-src",
                   "--denoising-strength", "0.6", "--seed", "43", "-o", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "c" / "image-0.png").tobytes() != a.tobytes()


def test_inpainting_flags_reach_the_server(sdctl, server, source, tmp_path):
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 0).save(mask)
    with Image.open(mask) as m:
        m.paste(255, (16, 16, 48, 48))
        m.save(mask)
    result = sdctl("img2img", "--local", server.url, "-i", source / "image-0.png", "-p", "a door", "--steps", "2",
                   "--width", "64", "--height", "64", "--seed", "5", "--mask", mask, "--mask-blur", "2",
                   "--inpainting-fill", "original", "--denoising-strength", "0.9", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output + server.log_tail()
    text = png_text((tmp_path / "out" / "image-0.png").read_bytes())
    assert "Mask blur: 2" in text and "Denoising strength: 0.9" in text


def test_server_and_store_errors(sdctl, server, source, tmp_path):
    small = tmp_path / "small.png"
    Image.new("L", (32, 32), 255).save(small)
    result = sdctl("img2img", "--local", server.url, "-i", source / "image-0.png", "--mask", small, "--steps", "2",
                   "--width", "64", "--height", "64", "-o", tmp_path)
    assert result.exit_code == 2 and "mask" in result.output  # the server's 422, naming the field
    result = sdctl("--output", server.output, "img2img", "--local", server.url, "--from-job", "no-such-job", "-o", tmp_path)
    assert result.exit_code == 4 and "no-such-job" in result.output
    result = sdctl("--output", server.output, "img2img", "--local", server.url, "--from-job", "e2e-src:7", "-o", tmp_path)
    assert result.exit_code == 4 and "has no image 7" in result.output


# ---------------------------------------------------------------- ControlNet
def test_controlnet_unit_files_steer_txt2img_and_img2img(sdctl, server, source, tmp_path):
    import numpy as np

    edges = tmp_path / "units" / "edges.png"
    edges.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(edges)
    unit = tmp_path / "units" / "canny.json"
    unit.write_text(json.dumps({"enabled": True, "module": "canny", "model": "cn-a", "weight": 1.0, "image": "edges.png",
                                "processor_res": 64, "threshold_a": 50, "threshold_b": 150, "resize_mode": "Crop and Resize",
                                "control_mode": 0, "pixel_perfect": False}))
    common = ["-p", "a cat", "--steps", "2", "--width", "64", "--height", "64", "--seed", "5", "--sampler", "Euler"]
    plain = sdctl("txt2img", "--local", server.url, *common, "-o", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    steered = sdctl("txt2img", "--local", server.url, *common, "--controlnet", unit, "-o", tmp_path / "cn")
    assert steered.exit_code == 0, steered.output + server.log_tail()
    text = png_text((tmp_path / "cn" / "image-0.png").read_bytes())
    assert "ControlNet 0: \"Module: canny, Model: cn-a [" in text or "ControlNet 0: Module: canny, Model: cn-a [" in text
    a = np.asarray(Image.open(tmp_path / "plain" / "image-0.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "cn" / "image-0.png"), dtype=np.int16)
    assert np.abs(a - b).max() > 10  # the unit (its image read from a path next to the unit file) steered the image

    result = sdctl("--output", server.output, "img2img", "--local", server.url, "--from-job", "e2e-src", "--controlnet", unit,
                   "--denoising-strength", "0.7", "-o", tmp_path / "i2i")
    assert result.exit_code == 0, result.output + server.log_tail()
    assert "Model: cn-a [" in png_text((tmp_path / "i2i" / "image-0.png").read_bytes())
