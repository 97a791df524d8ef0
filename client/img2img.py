"""img2img requests from flags: init images and masks read from disk, A1111's enum fields, "send to img2img".

The body is A1111's ``/sdapi/v1/img2img`` payload: the txt2img fields plus
``init_images`` (A1111's list of base64 images; the server takes exactly one), ``denoising_strength``, ``resize_mode``, and the inpainting
fields (``mask``, ``mask_blur``, ``inpainting_fill``, ``inpaint_full_res``,
``inpaint_full_res_padding``, ``inpainting_mask_invert``). As for txt2img, only
the flags a user gave are sent; the server's defaults (A1111's) fill the rest.

``--from-job JOB[:n]`` ("send to img2img") starts from a finished job: its image
``n`` becomes the init image and its resolved parameters (``params.json``) the
defaults, which flags given on the command line override.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.config import EXIT_NOT_FOUND, EXIT_USAGE, CliError

#: A1111's ``resize_mode`` values (img2img tab order).
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
#: A1111's ``inpainting_fill`` values ("Masked content").
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")

# Signatures of the formats Pillow (the server's decoder) opens; anything else is refused before upload.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_FROM_JOB = re.compile(r"^(?P<job>[A-Za-z0-9._-]{1,128})(?::(?P<n>\d+))?$")


def is_image(data: bytes) -> bool:
    """True when ``data`` starts like a PNG, JPEG, GIF, BMP, TIFF or WebP file."""
    return data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def read_image_b64(path: Path | str, flag: str) -> str:
    """A local image file as base64 text; a missing, empty or non-image file is a usage error naming ``flag``."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CliError(f"{flag} {path}: no such file", EXIT_USAGE) from None
    except OSError as exc:
        raise CliError(f"{flag} {path}: cannot read it ({exc.strerror})", EXIT_USAGE) from None
    if not is_image(data):
        raise CliError(f"{flag} {path}: not a PNG, JPEG, WebP, GIF, BMP or TIFF image", EXIT_USAGE)
    return base64.b64encode(data).decode("ascii")


def looks_like_b64_image(text: str) -> bool:
    """True for base64 (optionally a ``data:`` URL) that decodes to an image."""
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            return False
    try:
        head_bytes = base64.b64decode(text[:64 - 64 % 4] or "", validate=True)
    except (binascii.Error, ValueError):
        return False
    return is_image(head_bytes)


def choice(value: str | None, names: tuple[str, ...], flag: str) -> int | None:
    """An A1111 enum flag: its index (``"1"``) or its name, case-insensitive (``"crop and resize"``)."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit() and int(text) < len(names):
        return int(text)
    lowered = [n.lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    options = ", ".join(f"{i} ({n})" for i, n in enumerate(names))
    raise CliError(f"{flag} {value!r}: expected one of {options}", EXIT_USAGE)


def img2img_payload(
    base: dict[str, Any],
    init_images: list[str],
    *,
    denoising_strength: float | None = None,
    resize_mode: int | None = None,
    mask: str | None = None,
    mask_blur: int | None = None,
    inpainting_fill: int | None = None,
    inpaint_full_res: bool | None = None,
    inpaint_full_res_padding: int | None = None,
    inpainting_mask_invert: bool | None = None,
) -> dict[str, Any]:
    """An A1111 ``/sdapi/v1/img2img`` body: ``base`` (txt2img fields) + base64 ``init_images`` + the given img2img fields."""
    if not init_images:
        raise CliError("img2img needs an init image: --init-image PATH or --from-job JOB[:n]", EXIT_USAGE)
    if len(init_images) > 1:  # the server takes one init image per request (A1111 would cycle them over a batch)
        raise CliError(f"--init-image given {len(init_images)} times: one init image per request", EXIT_USAGE)
    if denoising_strength is not None and not 0.0 <= denoising_strength <= 1.0:
        raise CliError(f"--denoising-strength {denoising_strength}: must be between 0 and 1", EXIT_USAGE)
    for flag, value in (("--mask-blur", mask_blur), ("--inpaint-full-res-padding", inpaint_full_res_padding)):
        if value is not None and value < 0:
            raise CliError(f"{flag} {value}: must be 0 or more", EXIT_USAGE)
    masking_flags = {"--mask-blur": mask_blur, "--inpainting-fill": inpainting_fill, "--inpaint-full-res": inpaint_full_res,
                     "--inpaint-full-res-padding": inpaint_full_res_padding, "--inpainting-mask-invert": inpainting_mask_invert}
    if mask is None:
        given = [flag for flag, value in masking_flags.items() if value not in (None, False)]
        if given:  # silently ignored by A1111 without a mask: say so instead
            raise CliError(f"{', '.join(given)} only apply with --mask PATH", EXIT_USAGE)
    payload = {**base, "init_images": list(init_images)}
    for key, value in (
        ("denoising_strength", denoising_strength),
        ("resize_mode", resize_mode),
        ("mask", mask),
        ("mask_blur", mask_blur),
        ("inpainting_fill", inpainting_fill),
        ("inpaint_full_res", inpaint_full_res),
        ("inpaint_full_res_padding", inpaint_full_res_padding),
    ):
        if value is not None:
            payload[key] = value
    if inpainting_mask_invert is not None:
        payload["inpainting_mask_invert"] = int(inpainting_mask_invert)  # A1111's field is 0/1
    return payload


@dataclass
class JobStart:
    """What "send to img2img" takes from a finished job."""

    job_id: str
    index: int
    image_b64: str
    defaults: dict[str, Any] = field(default_factory=dict)  # keyword arguments of txt2img_payload
    extra: dict[str, Any] = field(default_factory=dict)  # img2img fields of an img2img source job


def parse_from_job(spec: str) -> tuple[str, int]:
    """``JOB[:n]`` → (job id, n); n defaults to 0."""
    match = _FROM_JOB.match(spec.strip())
    if not match:
        raise CliError(f"--from-job {spec!r}: expected JOB or JOB:n (n = image number, 0 for the first)", EXIT_USAGE)
    return match["job"], int(match["n"] or 0)


def _pick(params: dict, request: dict, *names: str) -> Any:
    """The first non-null value among ``names`` in the resolved params, then in the original request."""
    for source in (params, request):
        for name in names:
            if source.get(name) is not None:
                return source[name]
    return None


def job_start(store, spec: str) -> JobStart:
    """Image ``n`` and the parameters of job ``JOB`` (``--from-job JOB[:n]``); missing job/image/params → exit 4."""
    job_id, n = parse_from_job(spec)
    record = store.require_record(job_id)
    images = record.get("images") or []
    if n >= len(images) and record.get("status") != "succeed":
        raise CliError(f"job {job_id} is {record.get('status')}: it has no images to start from", EXIT_NOT_FOUND)
    name = images[n].rsplit("/", 1)[-1] if n < len(images) else f"image-{n}.png"
    data = store.loc.get(f"{job_id}/{name}")
    if data is None:
        have = f"{len(images)} image(s): use {job_id}:0" + (f" to {job_id}:{len(images) - 1}" if len(images) > 1 else "")
        raise CliError(f"job {job_id} has no image {n} ({have})", EXIT_NOT_FOUND)
    doc = store.get_json(job_id, "params.json")
    if doc is None:
        raise CliError(f"job {job_id} has no params.json: nothing to take the parameters from", EXIT_NOT_FOUND)
    params = doc.get("params") or {}
    request = doc.get("request") or {}
    overrides = request.get("override_settings") or {}
    seeds = params.get("seeds") or []
    checkpoint = doc.get("checkpoint")
    defaults = {
        "prompt": _pick(params, request, "prompt"),
        "negative": _pick(params, request, "negative_prompt"),
        "sampler": _pick(params, request, "sampler_name"),
        "scheduler": _pick(params, request, "schedule_type", "scheduler"),
        "steps": _pick(params, request, "steps"),
        "cfg": _pick(params, request, "cfg_scale"),
        "width": _pick(params, request, "width"),
        "height": _pick(params, request, "height"),
        # the seed image n was made with (a batch has one seed per image)
        "seed": seeds[n] if n < len(seeds) else _pick(params, request, "seed"),
        # the checkpoint that actually ran (also when the request named none and got the default)
        "checkpoint": (checkpoint.get("name") if isinstance(checkpoint, dict) else checkpoint)
        or params.get("checkpoint") or overrides.get("sd_model_checkpoint"),
        "vae": params.get("sd_vae") or overrides.get("sd_vae"),
        "clip_skip": params.get("clip_stop_at_last_layers", overrides.get("CLIP_stop_at_last_layers")),
    }
    # an img2img source job: keep its strength and resize mode (as A1111's "send to img2img" from img2img does)
    extra = {k: v for k in ("denoising_strength", "resize_mode") if (v := _pick(params, request, k)) is not None}
    if doc.get("task", record.get("task")) != "img2img":
        extra = {}
    return JobStart(job_id, n, base64.b64encode(data).decode("ascii"), {k: v for k, v in defaults.items() if v is not None}, extra)
