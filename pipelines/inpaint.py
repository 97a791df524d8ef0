"""img2img with a mask (inpainting) on a regular checkpoint, A1111's way.

What A1111 does, and so what happens here:

* the mask is inverted on request and blurred (``mask_blur``);
* *Only masked* (``inpaint_full_res``): the masked area's bounding box, grown by
  ``inpaint_full_res_padding`` and widened to the output's aspect ratio, is cut
  out, generated at ``width`` x ``height`` and pasted back into the original, so
  the result has the init image's size; *Whole picture*: the image is resized
  with ``resize_mode`` and generated whole;
* ``inpainting_fill`` prepares the masked area: 0 *fill* (surrounding colours
  blurred in), 1 *original*, 2 *latent noise*, 3 *latent nothing*;
* at every model call the denoised prediction is replaced by the init latents
  outside the (rounded) latent mask, and so is the final latent; the decoded
  image is composited over the original through the blurred mask.

The per-call blend works on the UNet's output through a forward hook (no
diffusers internals are patched) and only needs the timestep's
``alphas_cumprod``, so it holds for every sampler of the table.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from pipelines.image_input import from_png_bytes
from pipelines.img2img import (
    decode_latents,
    encode_pixels,
    img2img_view,
    run_from_latents,
)
from pipelines.params import Img2ImgParams
from pipelines.resize import resize_image


def inpaint(pipe, base_scheduler_config: dict, params: Img2ImgParams, *, should_abort: Callable[[], bool] | None = None, on_step=None) -> list[Image.Image]:
    """Generate ``params.image_count`` images that change only the masked part of ``params.init_image``."""
    view = img2img_view(pipe)
    original = _flatten(from_png_bytes(params.init_image))
    mask = from_png_bytes(params.mask).convert("L")
    if params.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if params.mask_blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(params.mask_blur))
    width, height = params.width, params.height
    pixel_mode = 0 if params.resize_mode == 3 else params.resize_mode
    paste_to = None
    if params.inpaint_full_res:
        box = expand_to_ratio(crop_region(mask, params.inpaint_full_res_padding), width, height, *mask.size)
        work_mask = resize_image(mask.crop(box), 2, width, height)
        work_image = resize_image(original.crop(box), 2, width, height)
        overlay = _overlay(original, mask)
        paste_to = box
    else:
        work_mask = resize_image(mask, pixel_mode, width, height)
        work_image = resize_image(original, pixel_mode, width, height)
        doubled = Image.fromarray(np.clip(np.asarray(work_mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8))
        overlay = _overlay(work_image, doubled)
    if params.inpainting_fill == 0:
        work_image = fill_masked(work_image, work_mask)
    init_latents = encode_pixels(view, work_image, _no_latent_resize(params))
    repaint = latent_mask(work_mask, init_latents).to(device=init_latents.device, dtype=init_latents.dtype)
    keep = 1.0 - repaint

    def start_latents(noise: torch.Tensor) -> torch.Tensor:
        if params.inpainting_fill == 2:  # latent noise
            return init_latents * keep + noise * repaint
        if params.inpainting_fill == 3:  # latent nothing
            return init_latents * keep
        return init_latents

    blend = _DenoisedBlend(view, init_latents, keep)
    handle = view.unet.register_forward_hook(blend, with_kwargs=True)
    try:
        latents = run_from_latents(
            view, base_scheduler_config, params, init_latents, should_abort=should_abort, on_step=on_step,
            extra_call={"output_type": "latent"}, start_latents=start_latents,
        )
    finally:
        handle.remove()
    images = []
    for latent in latents:
        final = latent.unsqueeze(0) * repaint + init_latents * keep
        images.append(_composite(decode_latents(view, final), overlay, paste_to, original.size))
    return images


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int]:
    """The masked pixels' bounding box grown by ``padding``, inside the image (the whole image if nothing is masked)."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return (0, 0, mask.width, mask.height)
    x1, y1, x2, y2 = box
    return (max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height))


def expand_to_ratio(box: tuple[int, int, int, int], width: int, height: int, image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """Grow ``box`` symmetrically to the ``width:height`` ratio, shifted back inside the image where it can be."""
    x1, y1, x2, y2 = box
    ratio = width / height
    box_w, box_h = x2 - x1, y2 - y1
    if box_w / box_h < ratio:  # too narrow: widen
        grow = int(box_h * ratio) - box_w
        x1, x2 = _grow(x1 - grow // 2, x2 + grow - grow // 2, image_w)
    else:  # too flat: heighten
        grow = int(box_w / ratio) - box_h
        y1, y2 = _grow(y1 - grow // 2, y2 + grow - grow // 2, image_h)
    return (x1, y1, x2, y2)


def _grow(lo: int, hi: int, limit: int) -> tuple[int, int]:
    if lo < 0:
        hi, lo = hi - lo, 0
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    return max(lo, 0), hi


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's *fill*: the masked area painted with the unmasked colours, blurred in from coarse to fine."""
    keep = ImageOps.invert(mask.convert("L"))
    visible = Image.new("RGBa", image.size)
    visible.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    result = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = visible.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def latent_mask(mask: Image.Image, latents: torch.Tensor) -> torch.Tensor:
    """The pixel mask at latent resolution, rounded to 0/1 as A1111 does: (1, 1, h, w), 1 = repaint."""
    h, w = latents.shape[-2:]
    small = np.asarray(mask.convert("RGB").resize((w, h)), dtype=np.float32)[..., 0] / 255.0
    return torch.from_numpy(np.around(small)).reshape(1, 1, h, w)


class _DenoisedBlend:
    """UNet forward hook: outside the mask, the model's denoised prediction becomes the init latents."""

    def __init__(self, view, init_latents: torch.Tensor, keep: torch.Tensor):
        scheduler_alphas = getattr(view.scheduler, "alphas_cumprod", None)
        self._view = view
        self._alphas = None if scheduler_alphas is None else scheduler_alphas.detach().to("cpu", torch.float64)
        self._init, self._keep = init_latents, keep

    def __call__(self, _module, args, kwargs, output):
        alphas = self._alphas if self._alphas is not None else self._view.scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        x = kwargs.get("sample", args[0] if args else None)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        pred = output[0] if isinstance(output, tuple) else output.sample
        a, s = _alpha_sigma(alphas, t, x)
        x64, p64 = x.to(torch.float64), pred.to(torch.float64)
        if self._view.scheduler.config.prediction_type == "v_prediction":
            x0 = a * x64 - s * p64
        else:
            x0 = (x64 - s * p64) / a
        keep = self._keep.to(x0.device, torch.float64)
        x0 = self._init.to(x0.device, torch.float64) * keep + (1 - keep) * x0
        eps = (x64 - a * x0) / s
        new = (a * eps - s * x0) if self._view.scheduler.config.prediction_type == "v_prediction" else eps
        new = new.to(pred.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else type(output)(sample=new)


def _alpha_sigma(alphas: torch.Tensor, t, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(ᾱ) and sqrt(1-ᾱ) at (possibly fractional) timestep ``t``, interpolated in log-sigma as diffusers maps sigmas."""
    t = torch.as_tensor(t).detach().to("cpu", torch.float64).flatten()[:1].clamp(0, len(alphas) - 1)
    log_sigmas = torch.log(((1 - alphas) / alphas).sqrt())
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(alphas) - 1)
    w = t - lo
    log_sigma = (1 - w) * log_sigmas[lo] + w * log_sigmas[hi]
    alpha_bar = 1.0 / (1.0 + torch.exp(2 * log_sigma))
    a = alpha_bar.sqrt().to(x.device).reshape(1, 1, 1, 1)
    s = (1 - alpha_bar).sqrt().to(x.device).reshape(1, 1, 1, 1)
    return a, s


def _overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The original pixels, transparent where the (blurred) mask repaints."""
    overlay = image.convert("RGBA")
    overlay.putalpha(ImageOps.invert(mask.convert("L")))
    return overlay


def _composite(generated: Image.Image, overlay: Image.Image, paste_to, original_size) -> Image.Image:
    if paste_to is not None:
        x1, y1, x2, y2 = paste_to
        canvas = Image.new("RGBA", original_size)
        canvas.paste(resize_image(generated, 1, x2 - x1, y2 - y1), (x1, y1))
        generated = canvas
    result = generated.convert("RGBA")
    result.alpha_composite(overlay)
    return result.convert("RGB")


def _flatten(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _no_latent_resize(params: Img2ImgParams) -> Img2ImgParams:
    from dataclasses import replace

    return replace(params, resize_mode=0) if params.resize_mode == 3 else params
