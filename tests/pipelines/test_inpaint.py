"""Inpainting (img2img with a mask) on tiny pipelines: only the masked part changes, A1111's modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.image_input import to_png_bytes
from pipelines.img2img import img2img
from pipelines.inpaint import crop_region, expand_to_ratio, fill_masked, latent_mask
from pipelines.params import Img2ImgParams
from pipelines.tiny import build_tiny_pipeline

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd1():
    return build_tiny_pipeline("sd1", seed=0)


def picture(size=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def box_mask(size=(64, 64), box=(16, 16, 48, 48)):
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def params(image, mask, **kw):
    base = {
        "prompt": "a cat", "negative_prompt": "", "seeds": [5], "subseeds": [6], "subseed_strength": 0.0, "sampler_name": "Euler",
        "schedule_type": "Automatic", "steps": 8, "cfg_scale": 7.0, "width": 64, "height": 64, "batch_size": 1, "n_iter": 1,
        "init_image": to_png_bytes(image), "mask": to_png_bytes(mask), "denoising_strength": 0.9, "mask_blur": 0,
        "inpaint_full_res": False, "inpainting_fill": 1,
    }
    base.update(kw)
    return Img2ImgParams(**base)


def run(pipe, p):
    return [np.asarray(im, dtype=np.float32) for im in img2img(pipe, dict(pipe.scheduler.config), p)]


def test_only_the_masked_area_changes(sd1):
    image, mask = picture(), box_mask()
    out = run(sd1, params(image, mask))[0]
    original = np.asarray(image, dtype=np.float32)
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], original[outside]), "unmasked pixels are the original's"
    assert np.abs(out[~outside] - original[~outside]).mean() > 5


def test_invert_swaps_the_areas(sd1):
    image, mask = picture(), box_mask()
    out = run(sd1, params(image, mask, inpainting_mask_invert=True))[0]
    inside = np.asarray(mask) > 0
    assert np.array_equal(out[inside], np.asarray(image, dtype=np.float32)[inside])


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "DDIM"])
def test_the_denoised_blend_keeps_the_unmasked_latents(sd1, sampler):
    """Inside the sampler, the latents outside the latent mask end at the init latents (any sampler)."""
    from pipelines import img2img as module

    captured = {}
    original = module.run_from_latents

    def spy(*args, **kwargs):
        captured["init"] = args[3]
        result = original(*args, **kwargs)
        captured["out"] = result
        return result

    module.run_from_latents = spy
    try:
        import pipelines.inpaint as inpaint_module

        inpaint_module.run_from_latents = spy
        run(sd1, params(picture(), box_mask(), sampler_name=sampler))
    finally:
        module.run_from_latents = original
        inpaint_module.run_from_latents = original
    final = captured["out"][0]
    keep = latent_mask(box_mask(), captured["init"]) == 0
    keep = keep.expand_as(final.unsqueeze(0))[0]
    # DDIM's last step lands on alphas_cumprod[0], not exactly on x0: compare on average, against the noise scale ~1
    assert (final[keep] - captured["init"][0][keep]).abs().mean() < 0.03


def test_fill_modes_differ_and_fill_paints_from_the_surroundings(sd1):
    image, mask = picture(), box_mask()
    outs = [run(sd1, params(image, mask, inpainting_fill=f, denoising_strength=0.5))[0] for f in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(outs[i] - outs[j]).mean() > 0.1, (i, j)
    red = Image.new("RGB", (64, 64), (250, 10, 10))
    filled = np.asarray(fill_masked(red, box_mask()))
    assert (filled[30:34, 30:34, 0] > 200).all(), "the hole is filled with the surrounding colour"


def test_only_masked_keeps_the_init_size_and_pastes_back(sd1):
    image = picture(size=(128, 96))
    mask = box_mask(size=(128, 96), box=(80, 40, 100, 60))
    out = run(sd1, params(image, mask, inpaint_full_res=True, inpaint_full_res_padding=8))[0]
    assert out.shape == (96, 128, 3)
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], np.asarray(image, dtype=np.float32)[outside])


def test_crop_region_and_ratio():
    mask = box_mask(size=(100, 80), box=(40, 30, 50, 40))
    assert crop_region(mask, 5) == (35, 25, 55, 45)
    assert crop_region(Image.new("L", (10, 10)), 4) == (0, 0, 10, 10)
    x1, y1, x2, y2 = expand_to_ratio((35, 25, 55, 45), 128, 64, 100, 80)
    assert (x2 - x1) == 2 * (y2 - y1) and 0 <= x1 and x2 <= 100
    # at the edge the box shifts inside the image
    x1, y1, x2, y2 = expand_to_ratio((0, 0, 10, 10), 64, 32, 100, 80)
    assert (x1, y1) == (0, 0) and x2 == 20


def test_blurred_mask_rounds_in_latent_space():
    mask = box_mask()
    small = latent_mask(mask, torch.zeros(1, 4, 8, 8))
    assert set(small.unique().tolist()) == {0.0, 1.0} and small[0, 0, 3, 3] == 1 and small[0, 0, 0, 0] == 0
