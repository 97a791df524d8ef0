"""A1111's hires fix: a txt2img first pass, an upscale, and an img2img second pass.

* Latent upscalers (``Latent``, ``Latent (bicubic)``, …) resize the first pass's
  latents with the matching interpolation and go straight into the second pass;
  ``None``/``Lanczos``/``Nearest`` decode, resize the picture and encode it again.
* A target with another aspect ratio (``hr_resize_x``/``hr_resize_y``) is reached
  by covering it and cutting the centre, as A1111 does.
* The second pass runs exactly ``hr_second_pass_steps`` steps (0: the first pass's
  count), the last ones of a schedule of ``steps / denoising_strength`` steps
  (A1111's explicit-steps img2img rule), with the same seeds drawn at the new size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch
from PIL import Image

from pipelines.img2img import (
    decode_latents,
    encode_pixels,
    img2img_view,
    run_from_latents,
)
from pipelines.params import Img2ImgParams, Txt2ImgParams
from pipelines.resize import resize_image
from pipelines.txt2img import txt2img

# A1111's latent upscale modes: (torch interpolation mode, antialias)
_LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
_PIL_FILTERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


def txt2img_hires(
    pipe,
    base_scheduler_config: dict,
    params: Txt2ImgParams,
    *,
    should_abort: Callable[[], bool] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """Both passes for ``params`` (which carries ``params.hires``); images at the hires size."""
    hr = params.hires
    first_total = params.steps * params.n_iter
    total = first_total + hr.steps * params.n_iter

    def first_progress(done: int, _total: int) -> None:
        if on_step is not None:
            on_step(done, total)

    def second_progress(done: int, _total: int) -> None:
        if on_step is not None:
            on_step(first_total + done, total)

    latent_mode = _LATENT_MODES.get(hr.upscaler)
    first = txt2img(
        pipe, base_scheduler_config, params, should_abort=should_abort, on_step=first_progress,
        output_type="latent" if latent_mode else "pil",
    )
    view = img2img_view(pipe)
    second = _second_pass_params(params)
    inits = [upscale_latents(latent.unsqueeze(0), latent_mode, hr.upscale_to, (hr.width, hr.height), view.vae_scale_factor) for latent in first] if latent_mode \
        else [encode_pixels(view, upscale_image(image, hr.upscaler, hr.upscale_to, (hr.width, hr.height)), second) for image in first]
    if hr.denoising_strength <= 0:  # nothing to re-sample: A1111 would run no step
        return [decode_latents(view, init) for init in inits]
    batches = iter([torch.cat(inits[lo : lo + params.batch_size]) for lo in range(0, len(inits), params.batch_size)])
    return run_from_latents(
        view, base_scheduler_config, second, inits[0], should_abort=should_abort, on_step=second_progress,
        start_latents=lambda _noise: next(batches), steps_run=hr.steps,
    )


def upscale_latents(latents: torch.Tensor, mode: tuple[str, bool], upscale_to: tuple[int, int], target: tuple[int, int], factor: int) -> torch.Tensor:
    """Interpolate (1, C, h, w) latents to ``upscale_to`` and cut the centre to ``target`` (pixel sizes)."""
    name, antialias = mode
    size = (upscale_to[1] // factor, upscale_to[0] // factor)
    kwargs = {"antialias": antialias} if name in ("bilinear", "bicubic") else {}
    scaled = torch.nn.functional.interpolate(latents.float(), size=size, mode=name, **kwargs).to(latents.dtype)
    cut_y, cut_x = size[0] - target[1] // factor, size[1] - target[0] // factor
    return scaled[:, :, cut_y // 2 : size[0] - (cut_y + 1) // 2, cut_x // 2 : size[1] - (cut_x + 1) // 2]


def upscale_image(image: Image.Image, upscaler: str, upscale_to: tuple[int, int], target: tuple[int, int]) -> Image.Image:
    """Resize the first pass's picture to ``upscale_to`` with the upscaler's filter, then cut the centre to ``target``."""
    scaled = image.convert("RGB").resize(upscale_to, _PIL_FILTERS[upscaler])
    return resize_image(scaled, 1, *target) if upscale_to != target else scaled


def _second_pass_params(params: Txt2ImgParams) -> Img2ImgParams:
    """The second pass as an img2img job: hires size, hires sampler/prompts, a schedule of steps/strength steps."""
    hr = params.hires
    values = {f.name: getattr(params, f.name) for f in fields(params)}
    values.update(
        prompt=hr.prompt,
        negative_prompt=hr.negative_prompt,
        sampler_name=hr.sampler_name,
        schedule_type=hr.schedule_type,
        steps=max(hr.steps, int(hr.steps / min(max(hr.denoising_strength, 1e-3), 0.999))),
        width=hr.width,
        height=hr.height,
        hires=None,
        denoising_strength=hr.denoising_strength,
    )
    return Img2ImgParams(**values)
