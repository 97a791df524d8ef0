"""img2img on tiny pipelines: A1111's step count, seeded noise, strength, resize modes, SDXL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.image_input import to_png_bytes
from pipelines.img2img import (
    a1111_steps_run,
    encode_init_image,
    img2img,
    img2img_view,
    prepare_init_image,
)
from pipelines.params import Img2ImgParams
from pipelines.tiny import build_tiny_pipeline

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd1():
    return build_tiny_pipeline("sd1", seed=0)


def init_image(size=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def params(image=None, **kw):
    base = {
        "prompt": "a cat", "negative_prompt": "", "seeds": [11], "subseeds": [12], "subseed_strength": 0.0, "sampler_name": "Euler",
        "schedule_type": "Automatic", "steps": 10, "cfg_scale": 7.0, "width": 64, "height": 64, "batch_size": 1, "n_iter": 1,
        "init_image": to_png_bytes(image or init_image()), "denoising_strength": 0.5,
    }
    base.update(kw)
    if "seeds" not in kw:
        count = base["batch_size"] * base["n_iter"]
        base["seeds"] = [11 + i for i in range(count)]
        base["subseeds"] = [12 + i for i in range(count)]
    return Img2ImgParams(**base)


def run(pipe, p, **kw):
    return [np.asarray(im, dtype=np.float32) for im in img2img(pipe, dict(pipe.scheduler.config), p, **kw)]


def unet_calls(pipe, p):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(kwargs.get("timestep", args[1] if len(args) > 1 else None)), with_kwargs=True)
    try:
        run(pipe, p)
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("steps, strength, expected", [(10, 0.5, 6), (20, 0.75, 16), (10, 1.0, 10), (10, 0.0, 1), (7, 0.3, 3)])
def test_step_count_is_a1111s(sd1, steps, strength, expected):
    assert a1111_steps_run(steps, strength) == expected
    assert len(unet_calls(sd1, params(steps=steps, denoising_strength=strength))) == expected


def test_progress_reaches_the_end_and_counts_real_steps(sd1):
    seen = []
    run(sd1, params(steps=10, denoising_strength=0.5, n_iter=2), on_step=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (12, 12) and len(seen) == 12


def test_same_seed_same_image_other_seed_other_image(sd1):
    a, b = run(sd1, params())[0], run(sd1, params())[0]
    c = run(sd1, params(seeds=[99], subseeds=[12]))[0]
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 1.0


def test_variation_seed_changes_the_image(sd1):
    a = run(sd1, params())[0]
    b = run(sd1, params(subseed_strength=0.5))[0]
    assert np.abs(a - b).mean() > 0.5


def test_batch_images_match_their_single_seed_runs(sd1):
    batch = run(sd1, params(batch_size=2))
    single = run(sd1, params(seeds=[12], subseeds=[13]))[0]
    assert np.abs(batch[1] - single).max() <= 2.0


def test_lower_strength_stays_closer_to_the_init_image(sd1):
    image = init_image()
    view = img2img_view(sd1)
    latents = encode_init_image(view, image, params(image))
    with torch.inference_mode():
        decoded = view.vae.decode(latents / view.vae.config.scaling_factor).sample
    reference = ((decoded[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).numpy()
    distances = [np.abs(run(sd1, params(image, denoising_strength=s))[0] - reference).mean() for s in (0.05, 0.5, 1.0)]
    assert distances[0] < distances[1] < distances[2], distances


def test_initial_noise_multiplier_changes_the_image(sd1):
    a = run(sd1, params())[0]
    b = run(sd1, params(initial_noise_multiplier=0.5))[0]
    assert np.abs(a - b).mean() > 0.5


def test_resize_modes_reach_the_generation_size(sd1):
    wide = init_image(size=(128, 64))
    for mode in (0, 1, 2, 3):
        p = params(wide, resize_mode=mode, width=64, height=64)
        latents = encode_init_image(img2img_view(sd1), wide, p)
        assert tuple(latents.shape[-2:]) == (8, 8), mode
        assert run(sd1, p)[0].shape == (64, 64, 3)
    # crop and resize vs just resize start from different pixels
    assert prepare_init_image(wide, params(wide, resize_mode=1)) != prepare_init_image(wide, params(wide, resize_mode=0))


def test_transparent_pixels_are_flattened_onto_white():
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    out = prepare_init_image(rgba, params(rgba))
    assert out.mode == "RGB" and out.getpixel((10, 10)) == (255, 255, 255)


def test_the_view_shares_the_resident_modules_and_follows_a_vae_switch(sd1):
    view = img2img_view(sd1)
    assert view.unet is sd1.unet and view.text_encoder is sd1.text_encoder and img2img_view(sd1) is view
    original = sd1.vae
    try:
        from diffusers import AutoencoderKL

        sd1.vae = AutoencoderKL.from_config(original.config)
        assert img2img_view(sd1).vae is sd1.vae
    finally:
        sd1.vae = original


def test_sdxl_img2img():
    pipe = build_tiny_pipeline("sdxl", seed=0)
    calls = unet_calls(pipe, params(steps=6, denoising_strength=0.5, width=64, height=64))
    assert len(calls) == 4
    out = run(pipe, params(steps=4))
    assert out[0].shape == (64, 64, 3)
