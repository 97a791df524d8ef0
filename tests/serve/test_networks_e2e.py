"""Extra networks through the real server: LoRA, hypernetwork, embedding and VAE by A1111 name."""

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.tiny import build_tiny_pipeline
from tests.support.lora_files import write_kohya_lora
from tests.support.network_files import random_vectors, write_embedding, write_hypernetwork, write_vae
from tests.support.model_fixtures import copy_checkpoint
from tests.support.server import ServerProcess

BASE = {"prompt": "a photo of a cat", "negative_prompt": "", "steps": 2, "width": 64, "height": 64, "seed": 3, "cfg_scale": 5}


@pytest.fixture(scope="module")
def net_server(tiny_model_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("netstore")
    copy_checkpoint(tiny_model_store, "tiny-sd1", root / "Stable-diffusion")
    pipe = build_tiny_pipeline("sd1", seed=0)
    write_kohya_lora(root / "Lora" / "styles" / "inky.safetensors", pipe, "sd1", seed=1, magnitude=0.5)
    write_kohya_lora(root / "Lora" / "bright.safetensors", pipe, "sd1", seed=2, magnitude=0.5)
    width = pipe.text_encoder.config.hidden_size
    sizes = sorted({width, *pipe.unet.config.block_out_channels})
    write_hypernetwork(root / "hypernetworks" / "anime.pt", sizes, seed=4, std=0.5)
    write_embedding(root / "embeddings" / "myemb.pt", "a1111-pt", random_vectors(2, width, seed=5, std=3.0))
    write_vae(root / "VAE" / "warm.safetensors", build_tiny_pipeline("sd1", seed=9).vae)
    out = tmp_path_factory.mktemp("netout")
    proc = ServerProcess({"MODEL_STORE": str(root), "OUTPUT": str(out), "CACHE_DIR": str(out / "cache")}, log_path=out / "server.log").start()
    proc.output = out
    try:
        yield proc
    finally:
        proc.stop()


def run(server, **changes):
    body = {**BASE, **changes}
    r = httpx.post(server.url + "/invocations", json=body, timeout=120)
    return r


def image(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"), dtype=np.int16)


def infotext(r) -> str:
    return json.loads(r.json()["info"])["infotexts"][0]


def test_lora_changes_the_image_and_is_recorded(net_server):
    base = image(run(net_server))
    r = run(net_server, prompt="a photo of a cat <lora:inky:1>")
    with_lora = image(r)
    assert np.abs(with_lora - base).max() > 5
    text = infotext(r)
    assert text.startswith("a photo of a cat <lora:inky:1>") and "Lora hashes: \"inky: " in text
    params = json.loads((net_server.output / r.json()["job_id"] / "params.json").read_text())
    assert params["networks"]["loras"][0]["name"] == "inky" and len(params["networks"]["loras"][0]["sha256"]) == 64
    # the next request without the tag is the base model again
    assert np.abs(image(run(net_server)) - base).max() <= 1
    # weight 0 is the base model; two LoRAs differ from one
    assert np.abs(image(run(net_server, prompt="a photo of a cat <lora:inky:0>")) - base).max() <= 1
    both = image(run(net_server, prompt="a photo of a cat <lora:inky:1> <lora:bright:0.8>"))
    assert np.abs(both - with_lora).max() > 5


def test_hypernetwork_changes_the_image(net_server):
    base = image(run(net_server))
    r = run(net_server, prompt="a photo of a cat <hypernet:anime:1>")
    assert np.abs(image(r) - base).max() > 5
    assert "Hypernet: anime" in infotext(r)
    assert np.abs(image(run(net_server)) - base).max() == 0


def test_embedding_by_name(net_server):
    base = image(run(net_server, prompt="a photo of a dog"))
    r = run(net_server, prompt="a photo of a myemb")
    assert np.abs(image(r) - base).max() > 5
    assert "TI hashes: \"myemb: " in infotext(r)


def test_vae_named_automatic_none(net_server):
    own = image(run(net_server))
    r = run(net_server, override_settings={"sd_vae": "warm.safetensors"})
    assert np.abs(image(r) - own).max() > 5
    assert "VAE: warm.safetensors" in infotext(r)
    assert np.abs(image(run(net_server, override_settings={"sd_vae": "None"})) - own).max() == 0
    assert np.abs(image(run(net_server, override_settings={"sd_vae": "Automatic"})) - own).max() == 0


@pytest.mark.parametrize(
    "changes, status, words",
    [
        ({"prompt": "x <lora:nothere:1>"}, 404, "nothere"),
        ({"prompt": "x <hypernet:ghost:1>"}, 404, "ghost"),
        ({"prompt": "x <lora:inky:abc>"}, 422, "abc"),
        ({"override_settings": {"sd_vae": "missing.pt"}}, 404, "missing.pt"),
        ({"prompt": "a cat AND a dog"}, 422, "AND"),
    ],
)
def test_bad_network_names(net_server, changes, status, words):
    r = run(net_server, **changes)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
