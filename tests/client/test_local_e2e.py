"""`sdctl txt2img --local` against a real server process over the tiny model store, then `get`/`show`."""

from __future__ import annotations

import json

import pytest

from client.jobs import png_text
from tests.support.server import running_server


@pytest.fixture(scope="module")
def server(tiny_model_store, tmp_path_factory):
    with running_server(tiny_model_store, tmp_path_factory.mktemp("server")) as proc:
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
