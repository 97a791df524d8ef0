"""Run one resolved txt2img job on a loaded diffusers pipeline.

The pipeline object is reused across jobs; only the scheduler is rebuilt per
job (cheap, and it keeps the checkpoint's own betas and prediction type).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from PIL import Image

from pipelines.errors import Cancelled, GenerationFailed
from pipelines.noise import batch_latents
from pipelines.params import Txt2ImgParams
from pipelines.samplers import resolve_sampler
from pipelines.schedulers import make_scheduler

log = logging.getLogger(__name__)


def diffusers_clip_skip(clip_stop_at_last_layers: int) -> int | None:
    """A1111's "stop at last layers" N means diffusers' ``clip_skip`` N-1 (None for N=1)."""
    return clip_stop_at_last_layers - 1 if clip_stop_at_last_layers > 1 else None


def txt2img(
    pipe,
    base_scheduler_config: dict,
    params: Txt2ImgParams,
    *,
    should_abort: Callable[[], bool] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """Generate ``params.image_count`` images, ``n_iter`` batches of ``batch_size``.

    ``should_abort`` is polled at every step; when it returns True the job stops
    with :class:`Cancelled`. ``on_step(done, total)`` reports progress.
    """
    choice = resolve_sampler(params.sampler_name, params.schedule_type)
    device = pipe._execution_device
    dtype = pipe.unet.dtype
    latent_shape = (
        pipe.unet.config.in_channels,
        params.height // pipe.vae_scale_factor,
        params.width // pipe.vae_scale_factor,
    )
    total_steps = params.steps * params.n_iter
    images: list[Image.Image] = []
    for it in range(params.n_iter):
        lo, hi = it * params.batch_size, (it + 1) * params.batch_size
        seeds = params.seeds[lo:hi]
        latents = batch_latents(
            seeds, params.subseeds[lo:hi], params.subseed_strength, latent_shape, device=device, dtype=dtype
        )
        # One generator per image for the sampler's own noise (ancestral/SDE), seeded like A1111.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        done_before = it * params.steps
        # a fresh scheduler per batch: SDE samplers seed their noise from the batch's first seed, as A1111
        pipe.scheduler = make_scheduler(choice, base_scheduler_config, seed=int(seeds[0]))

        def step_end(_pipe, step, _timestep, kwargs, _done_before=done_before):
            if should_abort is not None and should_abort():
                raise Cancelled("job cancelled: the server is shutting down")
            if on_step is not None:
                on_step(_done_before + step + 1, total_steps)
            return kwargs

        extra = {}
        if params.eta is not None and "eta" in _call_args(pipe):
            extra["eta"] = params.eta
        try:
            with torch.inference_mode():
                out = pipe(
                    prompt=[params.prompt] * len(seeds),
                    negative_prompt=[params.negative_prompt] * len(seeds),
                    num_inference_steps=params.steps,
                    guidance_scale=params.cfg_scale,
                    width=params.width,
                    height=params.height,
                    latents=latents,
                    generator=generators,
                    clip_skip=diffusers_clip_skip(params.clip_stop_at_last_layers),
                    callback_on_step_end=step_end,
                    output_type="pil",
                    **extra,
                )
        except Cancelled:
            raise
        except torch.OutOfMemoryError as exc:
            raise GenerationFailed(f"out of device memory at {params.width}x{params.height} batch {params.batch_size}: reduce size or batch_size") from exc
        images.extend(out.images)
    return images


def _call_args(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)
