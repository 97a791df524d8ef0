"""Turn an HTTP body into a resolved job: envelope or bare A1111 payload → Job.

Everything that can be decided without torch is decided here, so a bad request
is answered 422 at once instead of after a trip through the worker queue.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from model_cache.access import S3AllowList, parse_prefixes
from model_cache.explicit import ExplicitModels, parse_models
from pipelines.errors import InvalidParameter
from pipelines.params import Img2ImgParams, Txt2ImgParams
from pipelines.prompt import (
    extract_networks,
    has_and,
    hypernet_specs,
    lora_specs,
    strip_comments,
)
from pipelines.samplers import resolve_sampler
from serve.errors import MalformedBody
from serve.hires import resolve_hires
from serve.img2img import looks_like_img2img, resolve_img2img
from serve.schemas import Envelope, Img2ImgPayload, OutputSpec, Txt2ImgPayload
from serve.settings import Settings

# override_settings we honour; others are reported back as ignored.
_HONOURED_OVERRIDES = {"sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae", "sdxl_clip_l_skip"}
# override_settings that would change the image and that we cannot honour yet: refused.
_REFUSED_OVERRIDES = {
    "eta_noise_seed_delta": lambda v: v not in (None, 0),
    "randn_source": lambda v: v not in (None, "CPU"),
}


# A1111 fields that only matter with a feature off by default (hires fix) or that
# only steer WebUI-side saving: accepted without comment while they are inert.
_INERT_FIELDS = {
    "hr_additional_modules", "hr_cfg", "hr_distilled_cfg", "do_not_save_samples",
    "do_not_save_grid", "save_images", "comments", "force_task_id", "infotext", "disable_extra_networks",
    "refiner_switch_at", "firstpass_image", "s_min_uncond",
}
# strings longer than this in a request are images (prompts are far shorter)
_LONG_STRING = 8192
# request keys that carry base64 images (img2img, ControlNet units)
_IMAGE_KEYS = {"init_images", "mask", "image", "input_image", "mask_image"}
# k-diffusion "churn" knobs: A1111 defaults; other values change Euler/Heun/DPM2 there, not here.
_CHURN_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}


@dataclass
class Job:
    """A validated job, ready for the worker."""

    job_id: str
    task: str
    params: Txt2ImgParams | Img2ImgParams
    output: OutputSpec
    payload: dict[str, Any]
    parameters: dict[str, Any] = field(default_factory=dict)
    send_images: bool = True
    warnings: list[str] = field(default_factory=list)
    controlnet_units: list[Any] = field(default_factory=list)  # pipelines.control_units.ControlUnit, enabled ones
    models: ExplicitModels = field(default_factory=ExplicitModels)  # the envelope's explicit S3 locations
    image_sources: dict[str, str] = field(default_factory=dict)  # payload field → the URI its image was read from


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode JSON; malformed bodies raise :class:`MalformedBody` (400)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedBody(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedBody("request body must be a JSON object")
    return body


def build_job(body: dict[str, Any], settings: Settings, *, task: str | None = None) -> Job:
    """Validate a decoded body (envelope or bare payload) and resolve it into a :class:`Job`."""
    if "payload" in body:
        envelope = _validate(Envelope, body, settings, prefix="")
        if task is not None and envelope.task != task:
            raise InvalidParameter(f"task: this route runs {task}, the envelope says {envelope.task}", field="task")
    else:
        envelope = Envelope(task=task or ("img2img" if looks_like_img2img(body) else "txt2img"), payload=body)
    explicit = parse_models(envelope.models, allow=model_allow_list(settings))
    prefix = "payload." if "payload" in body else ""
    schema = Img2ImgPayload if envelope.task == "img2img" else Txt2ImgPayload
    payload = _validate(schema, envelope.payload, settings, prefix=prefix)
    warnings = _refuse_unsupported(payload, prefix)
    params = _resolve(payload, settings, prefix, warnings)
    if envelope.task == "img2img":
        if payload.enable_hr:
            warnings.append(f"{prefix}enable_hr: img2img has no hires fix (A1111 ignores it too)")
        params = resolve_img2img(payload, params, settings, prefix, warnings)
    elif payload.enable_hr:
        params = resolve_hires(payload, params, settings, prefix, warnings)
    units = _controlnet_units(payload, settings, prefix, warnings, has_init_image=envelope.task == "img2img")
    if explicit.default_checkpoint() and not (payload.override_settings or {}).get("sd_model_checkpoint"):
        params = replace(params, checkpoint=explicit.default_checkpoint())  # no name: the checkpoint the request located
    return Job(
        job_id=envelope.id or str(uuid.uuid4()),
        task=envelope.task,
        params=params,
        output=envelope.output,
        payload=_without_images(envelope.payload),
        parameters=_parameters(payload),
        send_images=payload.send_images,
        warnings=warnings,
        controlnet_units=units,
        models=explicit,
    )


def model_allow_list(settings: Settings) -> S3AllowList | None:
    """Where explicit model locations may point: MODEL_STORE's prefix and ALLOWED_S3_PREFIXES (``None``: a local store)."""
    if not settings.model_store.startswith("s3://"):
        return None
    return S3AllowList([settings.model_store, *parse_prefixes(settings.allowed_s3_prefixes)])


def _controlnet_units(p: Txt2ImgPayload, settings: Settings, prefix: str, warnings: list[str], *, has_init_image: bool) -> list:
    """``alwayson_scripts.controlnet.args`` parsed and checked here, so a bad unit is a 422 before queueing."""
    from pipelines.control_units import parse_units
    from serve.img2img import image_pixel_limit

    scripts = {name.lower(): args for name, args in (p.alwayson_scripts or {}).items()}
    return parse_units(scripts.get("controlnet"), max_units=settings.max_controlnet_units, max_pixels=image_pixel_limit(settings),
                       has_init_image=has_init_image, warnings=warnings, prefix=prefix)


def _without_images(value: Any, key: str = "") -> Any:
    """The request as recorded in ``params.json``: images (and any very long string) become a short digest."""
    if isinstance(value, dict):
        return {k: _without_images(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_images(v, key) for v in value]
    if isinstance(value, str) and (len(value) > _LONG_STRING or (key in _IMAGE_KEYS and len(value) > 64)):
        digest = hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:16]
        return f"<{len(value)} characters, sha256 {digest}>"
    return value


def _parameters(payload: Txt2ImgPayload) -> dict[str, Any]:
    """A1111 echoes the request's parameters; images are echoed as placeholders, not megabytes of base64."""
    data = payload.model_dump(exclude=set(payload.model_extra or ()))
    if isinstance(payload, Img2ImgPayload):
        data["init_images"] = [f"<image {i}>" for i in range(len(payload.init_images))]
        data["mask"] = "<mask>" if payload.mask else None
    return data


def _validate(model, data: dict, settings: Settings, prefix: str):
    try:
        return model.model_validate(data, context={"limits": settings})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = f"unknown field (allowed: {', '.join(model.model_fields)})"
        raise InvalidParameter(f"{prefix}{loc}: {msg}", field=f"{prefix}{loc}") from None


def _refuse_unsupported(p: Txt2ImgPayload, prefix: str) -> list[str]:
    """Refuse what would change the image but is not built yet; collect warnings for the rest."""

    def refuse(name: str, what: str) -> None:
        raise InvalidParameter(f"{prefix}{name}: {what} is not supported yet", field=f"{prefix}{name}")

    if p.restore_faces:
        refuse("restore_faces", "face restoration")
    if p.tiling:
        refuse("tiling", "tiling")
    if p.refiner_checkpoint:
        refuse("refiner_checkpoint", "the SDXL refiner")
    if p.script_name:
        refuse("script_name", f"script '{p.script_name}'")
    if p.styles:
        refuse("styles", "saved styles")
    if p.seed_resize_from_h > 0 or p.seed_resize_from_w > 0:
        refuse("seed_resize_from_w", "resizing the seed")
    for name, args in (p.alwayson_scripts or {}).items():
        if name.lower() == "controlnet":
            continue  # parsed by _controlnet_units
        if args not in (None, {}, {"args": []}):
            refuse(f"alwayson_scripts.{name}", f"always-on script '{name}'")
    _check_prompts(p, prefix)
    warnings: list[str] = []
    overrides = p.override_settings or {}
    for key, value in overrides.items():
        check = _REFUSED_OVERRIDES.get(key)
        if check and check(value):
            refuse(f"override_settings.{key}", f"{key}={value!r}")
        if key not in _HONOURED_OVERRIDES and not check:
            warnings.append(f"{prefix}override_settings.{key}: ignored (no effect on this server)")
    extra_fields = p.model_extra or {}
    for key, default in _CHURN_DEFAULTS.items():
        value = extra_fields.get(key)
        if value is not None and value != default and not (key == "s_tmax" and value in (None, float("inf"))):
            warnings.append(f"{prefix}{key}={value!r}: not applied (diffusers schedulers have no churn)")
    extras = sorted(set(extra_fields) - _INERT_FIELDS - set(_CHURN_DEFAULTS))
    if extras:
        warnings.append(f"ignored unknown fields: {', '.join(prefix + e for e in extras)}")
    return warnings


def _check_prompts(p: Txt2ImgPayload, prefix: str) -> None:
    """Extra-network tags must parse (names are resolved by the worker); AND is refused for now."""
    _, tags = extract_networks(strip_comments(p.prompt))
    lora_specs(tags, field=f"{prefix}prompt")
    hypernet_specs(tags, field=f"{prefix}prompt")
    _, negative_tags = extract_networks(strip_comments(p.negative_prompt))
    if negative_tags:
        raise InvalidParameter(
            f"{prefix}negative_prompt: extra networks ('<{negative_tags[0].kind}:{negative_tags[0].name}…>') belong in the prompt",
            field=f"{prefix}negative_prompt",
        )
    for fname, text in (("prompt", p.prompt), ("negative_prompt", p.negative_prompt)):
        if has_and(strip_comments(text)):
            raise InvalidParameter(
                f"{prefix}{fname}: AND (composable diffusion) is not supported yet; write one prompt",
                field=f"{prefix}{fname}",
            )


def _resolve(p: Txt2ImgPayload, settings: Settings, prefix: str, warnings: list[str]) -> Txt2ImgParams:
    if p.width * p.height > settings.max_pixels:
        raise InvalidParameter(
            f"{prefix}width: width*height must be at most {settings.max_pixels} pixels (got {p.width}x{p.height})",
            field=f"{prefix}width",
        )
    try:
        choice = resolve_sampler(p.sampler_name, p.scheduler, sampler_index=p.sampler_index)
    except InvalidParameter as exc:
        exc.field = f"{prefix}{exc.field or 'sampler_name'}"
        raise
    warnings.extend(choice.warnings)
    overrides = p.override_settings or {}
    clip_stop = overrides.get("CLIP_stop_at_last_layers", 1)
    if not isinstance(clip_stop, int) or isinstance(clip_stop, bool) or not 1 <= clip_stop <= 12:
        raise InvalidParameter(
            f"{prefix}override_settings.CLIP_stop_at_last_layers: must be an integer between 1 and 12 (got {clip_stop!r})",
            field=f"{prefix}override_settings.CLIP_stop_at_last_layers",
        )
    sd_vae = overrides.get("sd_vae")
    if sd_vae is not None and not isinstance(sd_vae, str):
        raise InvalidParameter(f"{prefix}override_settings.sd_vae: must be 'Automatic', 'None' or a VAE file name", field=f"{prefix}override_settings.sd_vae")
    checkpoint = overrides.get("sd_model_checkpoint")
    if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint.strip()):
        raise InvalidParameter(f"{prefix}override_settings.sd_model_checkpoint: must be a model name", field=f"{prefix}override_settings.sd_model_checkpoint")
    count = p.batch_size * p.n_iter
    seed = p.seed if p.seed != -1 else secrets.randbelow(2**32)
    subseed = p.subseed if p.subseed != -1 else secrets.randbelow(2**32)
    return Txt2ImgParams(
        # A1111 drops "# comments" (its default); the payload echoed back keeps them
        prompt=strip_comments(p.prompt),
        negative_prompt=strip_comments(p.negative_prompt),
        seeds=[(seed + i) % 2**32 for i in range(count)],
        subseeds=[(subseed + i) % 2**32 for i in range(count)],
        subseed_strength=p.subseed_strength,
        sampler_name=choice.sampler,
        schedule_type=choice.schedule,
        steps=p.steps,
        cfg_scale=p.cfg_scale,
        width=p.width,
        height=p.height,
        batch_size=p.batch_size,
        n_iter=p.n_iter,
        checkpoint=checkpoint.strip() if checkpoint else settings.default_checkpoint,
        clip_stop_at_last_layers=clip_stop,
        sd_vae=sd_vae,
        sdxl_clip_l_skip=bool(overrides.get("sdxl_clip_l_skip", False)),
        eta=p.eta,
    )
