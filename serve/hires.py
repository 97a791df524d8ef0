"""The hires-fix part of a txt2img request (``enable_hr`` and the ``hr_*`` fields) → :class:`HiresParams`.

A1111's rules: the target is ``width``/``height`` × ``hr_scale``, or
``hr_resize_x``/``hr_resize_y`` (one of them 0 keeps the aspect ratio; both
with another ratio scale to cover and cut the centre); the second pass runs
``hr_second_pass_steps`` steps (0 = the first pass's count) at
``denoising_strength``, with ``hr_sampler_name``/``hr_scheduler``/``hr_prompt``/
``hr_negative_prompt`` falling back to the first pass's.
"""

from __future__ import annotations

from dataclasses import replace

from pipelines.errors import InvalidParameter
from pipelines.params import HiresParams, Txt2ImgParams
from pipelines.prompt import strip_comments
from pipelines.samplers import resolve_sampler
from serve.schemas import Txt2ImgPayload
from serve.settings import Settings

LATENT_UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)")
IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")
_SAME = {None, "", "Use same sampler", "Use same scheduler", "Use same checkpoint"}
DEFAULT_DENOISING = 0.75  # A1111's txt2img API default when enable_hr is sent without it


def resolve_hires(p: Txt2ImgPayload, base: Txt2ImgParams, settings: Settings, prefix: str, warnings: list[str]) -> Txt2ImgParams:
    """``base`` with its hires pass resolved, or a 422 naming the ``hr_*`` field that cannot be honoured."""
    upscaler = _upscaler(p.hr_upscaler, prefix)
    if p.hr_checkpoint_name not in _SAME and p.hr_checkpoint_name != base.checkpoint:
        raise InvalidParameter(
            f"{prefix}hr_checkpoint_name: a different checkpoint for the second pass is not supported yet ('Use same checkpoint')",
            field=f"{prefix}hr_checkpoint_name",
        )
    if p.firstphase_width or p.firstphase_height:
        warnings.append(f"{prefix}firstphase_width/firstphase_height: ignored (old API; width/height are the first pass, as A1111 1.x)")
    upscale_to, target = _sizes(p, prefix)
    for name, value in (("width", target[0]), ("height", target[1])):
        if value > settings.max_side:
            raise InvalidParameter(
                f"{prefix}hr_scale: the hires {name} would be {value}, more than MAX_SIDE {settings.max_side}", field=f"{prefix}hr_scale"
            )
    if target[0] * target[1] > settings.max_pixels:
        raise InvalidParameter(
            f"{prefix}hr_scale: the hires size {target[0]}x{target[1]} is more than MAX_PIXELS {settings.max_pixels}", field=f"{prefix}hr_scale"
        )
    steps = p.hr_second_pass_steps or base.steps
    if steps > settings.max_steps:
        raise InvalidParameter(f"{prefix}hr_second_pass_steps: must be at most {settings.max_steps} (got {steps})", field=f"{prefix}hr_second_pass_steps")
    sampler, schedule = base.sampler_name, base.schedule_type
    if p.hr_sampler_name not in _SAME or p.hr_scheduler not in _SAME:
        try:
            choice = resolve_sampler(
                base.sampler_name if p.hr_sampler_name in _SAME else p.hr_sampler_name,
                base.schedule_type if p.hr_scheduler in _SAME else p.hr_scheduler,
            )
        except InvalidParameter as exc:
            field = "hr_scheduler" if p.hr_sampler_name in _SAME else "hr_sampler_name"
            raise InvalidParameter(f"{prefix}{field}: {exc.message}", field=f"{prefix}{field}") from None
        sampler, schedule = choice.sampler, choice.schedule
    strength = p.denoising_strength if p.denoising_strength is not None else DEFAULT_DENOISING
    hires = HiresParams(
        width=target[0],
        height=target[1],
        upscale_to=upscale_to,
        upscaler=upscaler,
        steps=steps,
        denoising_strength=strength,
        sampler_name=sampler,
        schedule_type=schedule,
        prompt=strip_comments(p.hr_prompt) if p.hr_prompt else base.prompt,
        negative_prompt=strip_comments(p.hr_negative_prompt) if p.hr_negative_prompt else base.negative_prompt,
        scale=p.hr_scale,
        resize=(p.hr_resize_x, p.hr_resize_y) if (p.hr_resize_x or p.hr_resize_y) else None,
        second_pass_steps=p.hr_second_pass_steps,
    )
    return replace(base, hires=hires)


def _upscaler(name: str | None, prefix: str) -> str:
    if name is None:
        return "Latent"  # A1111's default latent upscale mode
    for known in LATENT_UPSCALERS + IMAGE_UPSCALERS:
        if name.lower() == known.lower():
            return known
    raise InvalidParameter(
        f"{prefix}hr_upscaler: '{name}' is not available (model upscalers such as ESRGAN need weights this server does not ship); "
        f"available: {', '.join(LATENT_UPSCALERS + IMAGE_UPSCALERS)}",
        field=f"{prefix}hr_upscaler",
    )


def _sizes(p: Txt2ImgPayload, prefix: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the size the first pass is scaled to, the final size), both multiples of 8."""
    w, h = p.width, p.height
    x, y = p.hr_resize_x, p.hr_resize_y
    if not x and not y:
        target = (int(w * p.hr_scale), int(h * p.hr_scale))
        upscale_to = target
    elif not y:
        target = upscale_to = (x, x * h // w)
    elif not x:
        target = upscale_to = (y * w // h, y)
    else:
        target = (x, y)
        # cover the target, then cut the centre (A1111's truncate_x/truncate_y)
        upscale_to = (x, x * h // w) if w / h < x / y else (y * w // h, y)
    target = (target[0] // 8 * 8, target[1] // 8 * 8)
    upscale_to = (max(upscale_to[0] // 8 * 8, target[0]), max(upscale_to[1] // 8 * 8, target[1]))
    if min(target) < 64:
        raise InvalidParameter(f"{prefix}hr_scale: the hires size {target[0]}x{target[1]} is below 64", field=f"{prefix}hr_scale")
    return upscale_to, target
