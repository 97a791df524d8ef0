"""Hires fix on a tiny pipeline: both passes run, sizes, step counts, upscalers, per-image second-pass latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.hires import txt2img_hires, upscale_latents
from pipelines.params import HiresParams, Txt2ImgParams
from pipelines.tiny import build_tiny_pipeline

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd1():
    return build_tiny_pipeline("sd1", seed=0)


def params(upscaler="Latent", size=(64, 64), target=(96, 96), upscale_to=None, hr_steps=3, strength=0.5, batch=1, **kw):
    count = batch
    hires = HiresParams(
        width=target[0], height=target[1], upscale_to=upscale_to or target, upscaler=upscaler, steps=hr_steps,
        denoising_strength=strength, sampler_name="Euler", schedule_type="Automatic", prompt="a cat", negative_prompt="",
        scale=1.5,
    )
    values = {
        "prompt": "a cat", "negative_prompt": "", "seeds": [21 + i for i in range(count)], "subseeds": [31 + i for i in range(count)],
        "subseed_strength": 0.0, "sampler_name": "Euler", "schedule_type": "Automatic", "steps": 4, "cfg_scale": 7.0,
        "width": size[0], "height": size[1], "batch_size": batch, "n_iter": 1, "hires": hires,
    }
    values.update(kw)
    return Txt2ImgParams(**values)


def run(pipe, p, **kw):
    return [np.asarray(im, dtype=np.float32) for im in txt2img_hires(pipe, dict(pipe.scheduler.config), p, **kw)]


def count_calls(pipe, p):
    shapes = []
    handle = pipe.unet.register_forward_pre_hook(lambda _m, args, kwargs: shapes.append(tuple(kwargs.get("sample", args[0] if args else None).shape[-2:])), with_kwargs=True)
    try:
        images = run(pipe, p)
    finally:
        handle.remove()
    return shapes, images


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest-exact)", "Lanczos", "Nearest", "None"])
def test_both_passes_run_at_their_sizes(sd1, upscaler):
    shapes, images = count_calls(sd1, params(upscaler))
    assert shapes == [(8, 8)] * 4 + [(12, 12)] * 3, "4 first-pass steps at 64px, then exactly hr_steps at 96px"
    assert images[0].shape == (96, 96, 3)


def test_upscalers_differ(sd1):
    a = run(sd1, params("Latent"))[0]
    b = run(sd1, params("Lanczos"))[0]
    assert np.abs(a - b).mean() > 0.5


def test_other_aspect_ratio_cuts_the_centre(sd1):
    _, images = count_calls(sd1, params(target=(128, 96), upscale_to=(128, 128)))
    assert images[0].shape == (96, 128, 3)


def test_progress_spans_both_passes(sd1):
    seen = []
    run(sd1, params(batch=2), on_step=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (7, 7) and seen[3] == (4, 7)


def test_each_image_of_a_batch_gets_its_own_first_pass(sd1):
    batch = run(sd1, params(batch=2))
    single = run(sd1, params(seeds=[22], subseeds=[32]))[0]
    assert np.abs(batch[1] - single).max() <= 2.0
    assert np.abs(batch[0] - batch[1]).mean() > 1.0


def test_zero_strength_only_upscales(sd1):
    shapes, images = count_calls(sd1, params(strength=0.0))
    assert len(shapes) == 4 and images[0].shape == (96, 96, 3)


def test_upscale_latents_cuts_symmetrically():
    latents = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = upscale_latents(latents, ("nearest", False), (64, 64), (48, 64), 8)
    assert out.shape == (1, 1, 8, 6)
    full = upscale_latents(latents, ("nearest", False), (64, 64), (64, 64), 8)
    assert torch.equal(out, full[:, :, :, 1:7])
