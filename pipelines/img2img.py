"""Run one resolved img2img job on the resident pipeline, A1111's way.

The img2img pipeline is built from the resident txt2img pipeline's own modules
(``from_pipe``: no weights copied) through a small subclass whose only change is
where the starting noise comes from: A1111's seeded noise (seeds, variation
seeds), exactly as txt2img uses it, instead of diffusers' generator draw.

A1111 semantics kept here:

* the init image is brought to ``width`` x ``height`` with ``resize_mode``
  (mode 3 encodes it at its own size and resizes the latents instead);
* with ``steps`` and ``denoising_strength`` the sampler runs
  ``int(min(strength, 0.999) * steps) + 1`` steps, the last ones of the full
  ``steps`` schedule (A1111's ``t_enc + 1``; diffusers alone runs one fewer);
* the init latent is the VAE posterior's mean (A1111 samples it with an unseeded
  global generator, so its own results are not reproducible there);
* ``initial_noise_multiplier`` scales the added noise;
* with a mask (inpainting), see :mod:`pipelines.inpaint`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from PIL import Image

from pipelines.image_input import from_png_bytes
from pipelines.params import Img2ImgParams
from pipelines.resize import resize_image
from pipelines.txt2img import run_batches

log = logging.getLogger(__name__)


class _SeededNoise:
    """Mixin: the noise added to the init latents is the one the caller put in ``seeded_noise``."""

    seeded_noise: torch.Tensor | None = None
    noise_multiplier: float = 1.0

    def prepare_latents(self, image, timestep, batch_size, num_images_per_prompt, dtype, device, generator=None, add_noise=True):
        init = image.to(device=device, dtype=dtype)
        if init.shape[0] != batch_size * num_images_per_prompt:
            init = init.repeat(batch_size * num_images_per_prompt // init.shape[0], 1, 1, 1)
        if not add_noise:
            return init
        noise = self.seeded_noise.to(device=device, dtype=dtype) * self.noise_multiplier
        return self.scheduler.add_noise(init, noise, timestep)


class SeededImg2Img(_SeededNoise, StableDiffusionImg2ImgPipeline):
    """SD1/SD2 img2img with A1111's seeded noise."""


class SeededImg2ImgXL(_SeededNoise, StableDiffusionXLImg2ImgPipeline):
    """SDXL img2img with A1111's seeded noise."""


# one img2img view per resident pipeline, dropped with it
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def img2img_view(pipe):
    """The img2img pipeline sharing ``pipe``'s modules (made once per resident pipeline)."""
    view = _VIEWS.get(pipe)
    if view is None:
        cls = SeededImg2ImgXL if hasattr(pipe, "text_encoder_2") else SeededImg2Img
        view = cls.from_pipe(pipe)
        view.set_progress_bar_config(disable=True)
        _VIEWS[pipe] = view
    # the resident pipeline's VAE may have been switched (sd_vae) since the view was made
    view.vae = pipe.vae
    return view


def a1111_steps_run(steps: int, denoising_strength: float) -> int:
    """How many sampling steps A1111 runs for img2img: ``t_enc + 1``."""
    return int(min(denoising_strength, 0.999) * steps) + 1


def img2img(
    pipe,
    base_scheduler_config: dict,
    params: Img2ImgParams,
    *,
    should_abort: Callable[[], bool] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """Generate ``params.image_count`` images starting from ``params.init_image``."""
    if params.mask is not None:
        from pipelines.inpaint import inpaint

        return inpaint(pipe, base_scheduler_config, params, should_abort=should_abort, on_step=on_step)
    view = img2img_view(pipe)
    init_latents = encode_init_image(view, from_png_bytes(params.init_image), params)
    return run_from_latents(view, base_scheduler_config, params, init_latents, should_abort=should_abort, on_step=on_step)


def run_from_latents(
    view,
    base_scheduler_config: dict,
    params: Img2ImgParams,
    init_latents: torch.Tensor,
    *,
    should_abort,
    on_step,
    extra_call: dict | None = None,
    start_latents: Callable[[torch.Tensor], torch.Tensor] | None = None,
    steps_run: int | None = None,
):
    """Noise ``init_latents`` to the start step and sample the rest of the schedule, batch by batch.

    ``start_latents(noise)``, when given, returns the latents to noise for a batch
    (inpainting's latent fills use the batch's own noise; hires fix gives each
    image its own). ``steps_run`` overrides A1111's img2img step count (hires fix).
    """
    schedule_steps = None
    if steps_run is None:
        steps_run = a1111_steps_run(params.steps, params.denoising_strength)
    else:  # hires fix: exactly ``steps_run`` steps, the last ones of a longer schedule
        schedule_steps = steps_run
    # diffusers runs int(steps * strength) steps: ask for exactly A1111's count
    strength = min(1.0, (steps_run + 0.5) / params.steps)
    view.noise_multiplier = params.initial_noise_multiplier

    def call(noise: torch.Tensor, generators: list, embeds: dict, step_end, extra: dict):
        view.seeded_noise = noise
        try:
            return view(
                **embeds,
                image=init_latents if start_latents is None else start_latents(noise),
                strength=strength,
                num_inference_steps=params.steps,
                guidance_scale=params.cfg_scale,
                generator=generators,
                callback_on_step_end=step_end,
                **{"output_type": "pil", **extra, **(extra_call or {})},
            ).images
        finally:
            view.seeded_noise = None

    latent_shape = tuple(init_latents.shape[1:])
    return run_batches(
        view, base_scheduler_config, params, latent_shape, call,
        steps_run=steps_run, should_abort=should_abort, on_step=on_step, schedule_steps=schedule_steps,
    )


def prepare_init_image(image: Image.Image, params: Img2ImgParams) -> Image.Image:
    """The init image as RGB at the generation size (A1111's resize modes; mode 3 keeps the size).

    Transparency is flattened onto white, as A1111 does (its default img2img background colour).
    """
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return resize_image(image.convert("RGB"), params.resize_mode, params.width, params.height)


def encode_init_image(view, image: Image.Image, params: Img2ImgParams) -> torch.Tensor:
    """VAE-encode the init image into scaled latents of the generation size (1, C, H/8, W/8)."""
    return encode_pixels(view, prepare_init_image(image, params), params)


def encode_pixels(view, prepared: Image.Image, params: Img2ImgParams) -> torch.Tensor:
    """VAE-encode an RGB image (the SDXL VAE in float32 when half precision would overflow, as diffusers does)."""
    vae = view.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    pixels = image_to_tensor(prepared).to(device=view._execution_device, dtype=torch.float32 if upcast else vae.dtype)
    try:
        if upcast:
            vae.to(dtype=torch.float32)
        with torch.inference_mode():
            latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    if params.resize_mode == 3:
        size = (params.height // view.vae_scale_factor, params.width // view.vae_scale_factor)
        latents = torch.nn.functional.interpolate(latents, size=size, mode="bilinear")
    return latents.to(view.unet.dtype)


def decode_latents(view, latents: torch.Tensor) -> Image.Image:
    """Scaled latents (1, C, h, w) → PIL image (the SDXL VAE in float32 when half precision would overflow)."""
    vae = view.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    try:
        if upcast:
            vae.to(dtype=torch.float32)
        with torch.inference_mode():
            pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    return view.image_processor.postprocess(pixels.float(), output_type="pil")[0]


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → (1, 3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
