"""A1111's image resize modes (img2img ``resize_mode`` and ControlNet's ``resize_mode``).

Pure Pillow. The modes, as A1111 numbers them:

0. *Just resize* — stretch to the target size.
1. *Crop and resize* — scale to cover the target, keep the centre, crop the rest.
2. *Resize and fill* — scale to fit inside the target, centre it, and fill the
   empty bands by stretching the image's edge rows/columns outwards.
3. *Just resize (latent upscale)* — img2img only: the image is encoded at its own
   size and the latents are resized (the pixel side does nothing here).
"""

from __future__ import annotations

from PIL import Image

from pipelines.errors import InvalidParameter

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
_LANCZOS = Image.Resampling.LANCZOS


def resize_mode_index(value: object, *, field: str, allow_latent: bool = True) -> int:
    """0..3 from an int or A1111's label (case-insensitive); anything else is a 422 naming ``field``."""
    labels = RESIZE_MODES if allow_latent else RESIZE_MODES[:3]
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) and 0 <= value < len(labels):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        for i, label in enumerate(labels):
            if text == label.lower():
                return i
        if text.isdigit() and int(text) < len(labels):
            return int(text)
    allowed = ", ".join(f"{i} ({label!r})" for i, label in enumerate(labels))
    raise InvalidParameter(f"{field}: unknown resize mode {value!r} (allowed: {allowed})", field=field)


def resize_image(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """``image`` brought to ``width`` x ``height`` by A1111 resize mode ``mode`` (3 returns it unchanged)."""
    if mode == 3:
        return image
    if mode == 0 or image.size == (width, height):
        return image.resize((width, height), _LANCZOS)
    target_ratio = width / height
    source_ratio = image.width / image.height
    if mode == 1:
        cover_width = target_ratio > source_ratio
        scaled_w = width if cover_width else image.width * height // image.height
        scaled_h = height if not cover_width else image.height * width // image.width
        scaled = image.resize((scaled_w, scaled_h), _LANCZOS)
        canvas = Image.new(image.mode, (width, height))
        canvas.paste(scaled, ((width - scaled_w) // 2, (height - scaled_h) // 2))
        return canvas
    if mode == 2:
        return _resize_and_fill(image, width, height, target_ratio, source_ratio)
    raise ValueError(f"resize mode {mode} out of range")


def _resize_and_fill(image: Image.Image, width: int, height: int, target_ratio: float, source_ratio: float) -> Image.Image:
    fit_width = target_ratio < source_ratio
    scaled_w = width if fit_width else max(1, image.width * height // image.height)
    scaled_h = height if not fit_width else max(1, image.height * width // image.width)
    scaled = image.resize((scaled_w, scaled_h), _LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    left, top = (width - scaled_w) // 2, (height - scaled_h) // 2
    canvas.paste(scaled, (left, top))
    if fit_width and top > 0:  # bands above and below: stretch the first/last rows
        canvas.paste(scaled.crop((0, 0, scaled_w, 1)).resize((width, top)), (0, 0))
        bottom = height - (top + scaled_h)
        if bottom > 0:
            canvas.paste(scaled.crop((0, scaled_h - 1, scaled_w, scaled_h)).resize((width, bottom)), (0, top + scaled_h))
    elif not fit_width and left > 0:  # bands left and right: stretch the first/last columns
        canvas.paste(scaled.crop((0, 0, 1, scaled_h)).resize((left, height)), (0, 0))
        right = width - (left + scaled_w)
        if right > 0:
            canvas.paste(scaled.crop((scaled_w - 1, 0, scaled_w, scaled_h)).resize((right, height)), (left + scaled_w, 0))
    return canvas
