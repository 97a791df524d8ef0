"""The img2img part of a request: init image, mask and their A1111 options → :class:`Img2ImgParams`.

Images are decoded and checked here, in the HTTP process, so a bad image is a 422
naming the field before anything is queued; the worker receives PNG bytes.
"""

from __future__ import annotations

from dataclasses import fields

from pipelines.errors import InvalidParameter
from pipelines.image_input import decode_image_b64, to_png_bytes
from pipelines.params import Img2ImgParams, Txt2ImgParams
from pipelines.resize import resize_mode_index
from serve.schemas import Img2ImgPayload
from serve.settings import Settings

# A1111 img2img fields that only matter with a mask (inpainting).
_MASK_FIELDS = ("mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert")
INPAINTING_FILL = ("fill", "original", "latent noise", "latent nothing")


def looks_like_img2img(body: dict) -> bool:
    """A bare A1111 body sent to ``/invocations`` is img2img when it carries ``init_images``."""
    return "init_images" in body


def resolve_img2img(p: Img2ImgPayload, base: Txt2ImgParams, settings: Settings, prefix: str, warnings: list[str]) -> Img2ImgParams:
    """Decode the init image (and mask), check the img2img options, and extend ``base`` with them."""
    images = p.init_images or []
    if not images:
        raise InvalidParameter(f"{prefix}init_images: img2img needs one init image (base64)", field=f"{prefix}init_images")
    if len(images) > 1:
        raise InvalidParameter(
            f"{prefix}init_images: {len(images)} images sent; one init image per request is supported", field=f"{prefix}init_images"
        )
    max_pixels = image_pixel_limit(settings)
    init = decode_image_b64(images[0], field=f"{prefix}init_images[0]", max_pixels=max_pixels)
    resize_mode = resize_mode_index(p.resize_mode, field=f"{prefix}resize_mode")
    if resize_mode == 3 and (init.width % 8 or init.height % 8):
        # the latents are resized, so the image is encoded at its own size: it must be a multiple of 8
        raise InvalidParameter(
            f"{prefix}resize_mode: 'Just resize (latent upscale)' needs an init image whose sides are multiples of 8 (got {init.width}x{init.height})",
            field=f"{prefix}resize_mode",
        )
    mask_bytes = None
    if p.mask:
        mask = decode_image_b64(p.mask, field=f"{prefix}mask", max_pixels=max_pixels)
        if mask.size != init.size:
            raise InvalidParameter(
                f"{prefix}mask: the mask is {mask.width}x{mask.height} but the init image is {init.width}x{init.height}",
                field=f"{prefix}mask",
            )
        mask_bytes = to_png_bytes(mask)
    else:
        for name in _MASK_FIELDS:
            if name in (p.model_fields_set or set()) and name not in ("inpaint_full_res", "inpainting_fill"):
                warnings.append(f"{prefix}{name}: no effect without a mask")
    if p.include_init_images:
        warnings.append(f"{prefix}include_init_images: the init image is not echoed back")
    blur_x = p.mask_blur if p.mask_blur is not None else p.mask_blur_x
    if p.mask_blur is None and p.mask_blur_x != p.mask_blur_y:
        warnings.append(f"{prefix}mask_blur_y: one blur radius is used for both axes ({blur_x})")
    return Img2ImgParams(
        **{f.name: getattr(base, f.name) for f in fields(base)},
        init_image=to_png_bytes(init),
        denoising_strength=p.denoising_strength,
        resize_mode=resize_mode,
        mask=mask_bytes,
        mask_blur=blur_x,
        inpainting_mask_invert=bool(p.inpainting_mask_invert),
        inpainting_fill=p.inpainting_fill,
        inpaint_full_res=p.inpaint_full_res,
        inpaint_full_res_padding=p.inpaint_full_res_padding,
        initial_noise_multiplier=p.initial_noise_multiplier if p.initial_noise_multiplier is not None else 1.0,
    )


def image_pixel_limit(settings: Settings) -> int:
    """Request images may be larger than what we generate (they are resized), within reason."""
    return max(settings.max_pixels * 4, settings.max_side * settings.max_side)
