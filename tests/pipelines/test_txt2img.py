"""txt2img end to end on tiny single-file checkpoints: A1111 conditioning reaches the UNet at the right steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.checkpoint import load_pipeline
from pipelines.conditioning import encode_prompts
from pipelines.errors import Cancelled
from pipelines.noise import batch_latents
from pipelines.params import Txt2ImgParams
from pipelines.samplers import resolve_sampler
from pipelines.schedulers import make_scheduler
from pipelines.txt2img import txt2img

torch.set_num_threads(1)

CHUNK = 77
# Where a tiny random model's image still responds to conditioning changed after the first steps.
SENSITIVE = {"steps": 4, "sampler": "DDIM", "cfg": 20.0}


def _trained_like(pipe):
    """Bias the text encoders' final layer norms as trained models have (zero-mean outputs make
    A1111's mean restoration divide rounding noise by rounding noise)."""
    gen = torch.Generator().manual_seed(0)
    for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if enc is not None:
            norm = getattr(enc, "text_model", enc).final_layer_norm
            with torch.no_grad():
                norm.bias.copy_(0.2 + 0.1 * torch.randn(norm.bias.shape, generator=gen))
    return pipe


class Model:
    def __init__(self, path):
        self.pipe = _trained_like(load_pipeline(path).pipe)
        self.config = dict(self.pipe.scheduler.config)

    def run(self, prompt, negative="", **kw):
        return [np.asarray(im, dtype=np.float32) for im in txt2img(self.pipe, self.config, _params(prompt, negative, **kw))]

    def unet_calls(self, prompt, negative="", **kw):
        """Run txt2img and record what each UNet call received: (encoder_hidden_states, text_embeds)."""
        calls = []

        def hook(_module, _args, kwargs):
            added = kwargs.get("added_cond_kwargs") or {}
            text_embeds = added.get("text_embeds")
            calls.append((kwargs["encoder_hidden_states"].clone(), None if text_embeds is None else text_embeds.clone()))

        handle = self.pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.run(prompt, negative, **kw)
        finally:
            handle.remove()
        return calls


def _params(prompt, negative="", *, steps=3, seeds=(11,), sampler="Euler", clip=1, cfg=7.0):
    return Txt2ImgParams(
        prompt=prompt, negative_prompt=negative, seeds=list(seeds), subseeds=list(seeds), subseed_strength=0.0,
        sampler_name=sampler, schedule_type="Automatic", steps=steps, cfg_scale=cfg, width=64, height=64,
        batch_size=len(seeds), n_iter=1, clip_stop_at_last_layers=clip,
    )


@pytest.fixture(scope="module")
def sd1(tiny_sd1_checkpoint):
    return Model(tiny_sd1_checkpoint)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_checkpoint):
    return Model(tiny_sdxl_checkpoint)


@pytest.fixture(scope="module")
def sd2(tiny_sd2_checkpoint):
    return Model(tiny_sd2_checkpoint)


def _differ(a, b):
    return float(np.abs(a - b).mean()) > 0.05


def _same(a, b):
    return float(np.abs(a - b).max()) <= 1.0  # 8-bit images: at most one level of rounding


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_family_runs_a1111_prompts(request, family):
    model = request.getfixturevalue(family)
    prompt = "a (red:1.3) [cat:dog:0.5], " + " ".join(["landscape"] * 80) + " BREAK [photo|painting]"
    images = model.run(prompt, "(ugly:1.2), blurry", seeds=(3, 4))
    assert len(images) == 2 and images[0].shape == (64, 64, 3)
    assert _differ(images[0], images[1])


@pytest.mark.parametrize("family, negative", [("sd1", ""), ("sdxl", "ugly")])
def test_plain_prompt_matches_diffusers_with_strings(request, family, negative):
    """The baseline: a short plain prompt gives what diffusers gives for the same strings."""
    model = request.getfixturevalue(family)
    ours = model.run("a red cat", negative, seeds=(5,))[0]
    pipe = model.pipe
    latents = batch_latents([5], [5], 0.0, (pipe.unet.config.in_channels, 8, 8), device="cpu", dtype=pipe.unet.dtype)
    pipe.scheduler = make_scheduler(resolve_sampler("Euler", "Automatic"), model.config, seed=5)
    with torch.inference_mode():
        ref = pipe(prompt=["a red cat"], negative_prompt=[negative], num_inference_steps=3, guidance_scale=7.0,
                   width=64, height=64, latents=latents, generator=[torch.Generator().manual_seed(5)], output_type="pil").images[0]
    assert _same(ours, np.asarray(ref, dtype=np.float32))


def test_emphasis_changes_the_image_and_weight_one_does_not(sd1):
    plain = sd1.run("a cat photo")[0]
    assert _differ(sd1.run("a (cat:1.5) photo")[0], plain)
    assert _same(sd1.run("a (cat:1.0) photo")[0], plain)


def test_long_prompt_tail_changes_the_image(sd1):
    words = ["cat"] * 110
    base = sd1.unet_calls(" ".join(words))
    words[99] = "dog"
    changed = sd1.unet_calls(" ".join(words))
    assert base[0][0].shape[1] == 2 * CHUNK
    # CFG batch is [negative, positive]: only the positive's second chunk moved.
    torch.testing.assert_close(changed[0][0][1, :CHUNK], base[0][0][1, :CHUNK])
    assert not torch.allclose(changed[0][0][1, CHUNK:], base[0][0][1, CHUNK:])
    assert _differ(sd1.run(" ".join(words))[0], sd1.run(" ".join(["cat"] * 110))[0])


def _which(calls, options):
    """For each UNet call, the index of the option its positive conditioning equals."""
    out = []
    for hidden, _ in calls:
        pos = hidden[hidden.shape[0] // 2 :][:1]
        out.append(next(i for i, o in enumerate(options) if torch.allclose(pos, o, atol=1e-6)))
    return out


def _pos(model, prompt, steps):
    return encode_prompts(model.pipe, prompt, "", steps).at(0).prompt_embeds


def test_prompt_editing_switches_at_the_scheduled_step(sd1):
    cat, dog = _pos(sd1, "a cat", 4), _pos(sd1, "a dog", 4)
    # 4 steps, switch at 0.5: A1111 uses "cat" up to step 2 (0-based, inclusive), then "dog".
    assert _which(sd1.unet_calls("a [cat:dog:0.5]", steps=4), [cat, dog]) == [0, 0, 0, 1]
    # On the tiny model late steps barely move pixels: switch early, with DDIM and strong guidance.
    edited = sd1.run("a [cat:dog:0.25]", **SENSITIVE)[0]
    assert _differ(edited, sd1.run("a cat", **SENSITIVE)[0]) and _differ(edited, sd1.run("a dog", **SENSITIVE)[0])


def test_alternation_switches_every_step(sd1):
    cat, dog = _pos(sd1, "a cat", 4), _pos(sd1, "a dog", 4)
    assert _which(sd1.unet_calls("a [cat|dog]", steps=4), [cat, dog]) == [0, 0, 1, 0]
    alternating = sd1.run("a [cat|dog]", **SENSITIVE)[0]
    assert _differ(alternating, sd1.run("a cat", **SENSITIVE)[0]) and _differ(alternating, sd1.run("a dog", **SENSITIVE)[0])


def test_second_order_sampler_schedules_over_model_calls(sd1):
    # Heun: 4 steps are 7 UNet calls; A1111 schedules over 2 x 4 = 8, so "cat" serves calls 0-4.
    cat, dog = _pos(sd1, "a cat", 8), _pos(sd1, "a dog", 8)
    assert _which(sd1.unet_calls("a [cat:dog:0.5]", steps=4, sampler="Heun"), [cat, dog]) == [0] * 5 + [1] * 2


def test_sdxl_switches_pooled_embeds_with_the_schedule(sdxl):
    calls = sdxl.unet_calls("a [cat:dog:0.5]", "ugly", steps=4)
    pooled = [encode_prompts(sdxl.pipe, p, "ugly", 4).at(0).pooled for p in ("a cat", "a dog")]
    for i, (_, text_embeds) in enumerate(calls):
        torch.testing.assert_close(text_embeds[1:], pooled[0 if i <= 2 else 1], atol=1e-6, rtol=0)


def test_clip_skip_changes_sd1_image(sd1):
    assert _differ(sd1.run("a red cat", clip=2)[0], sd1.run("a red cat", clip=1)[0])


def test_batch_image_matches_its_seed_alone_with_editing(sd1):
    batch = sd1.run("a [cat:dog:0.5] photo", "ugly", seeds=(21, 22))
    alone = sd1.run("a [cat:dog:0.5] photo", "ugly", seeds=(22,))
    assert _same(batch[1], alone[0])


def test_abort_and_progress(sd1):
    seen = []
    txt2img(sd1.pipe, sd1.config, _params("a cat", steps=4, sampler="Heun"), on_step=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (4, 4) and all(d <= t for d, t in seen) and seen == sorted(seen)
    with pytest.raises(Cancelled):
        txt2img(sd1.pipe, sd1.config, _params("a cat"), should_abort=lambda: True)
