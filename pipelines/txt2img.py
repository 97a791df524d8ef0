"""Run one resolved txt2img job on a loaded diffusers pipeline (and the batch loop img2img shares).

The pipeline object is reused across jobs; only the scheduler is rebuilt per
job (cheap, and it keeps the checkpoint's own betas and prediction type).

Prompts are encoded by :mod:`pipelines.conditioning` (A1111 semantics: long
prompts, emphasis, BREAK, clip skip) and handed to diffusers as embeddings.
Prompt editing switches the conditioning between steps from the step-end
callback, which may replace the loop's ``prompt_embeds`` (already
``cat([negative, positive])`` under CFG) and, for SDXL, ``add_text_embeds``
(the pooled embeds; A1111 switches those with the schedule too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from PIL import Image

from pipelines.conditioning import ConditioningSchedule, Embeds, encode_prompts
from pipelines.errors import Cancelled, GenerationFailed
from pipelines.noise import batch_latents
from pipelines.params import Txt2ImgParams
from pipelines.samplers import resolve_sampler
from pipelines.schedulers import make_scheduler

log = logging.getLogger(__name__)


def txt2img(
    pipe,
    base_scheduler_config: dict,
    params: Txt2ImgParams,
    *,
    should_abort: Callable[[], bool] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    output_type: str = "pil",
) -> list[Image.Image]:
    """Generate ``params.image_count`` images, ``n_iter`` batches of ``batch_size``.

    ``should_abort`` is polled at every step; when it returns True the job stops
    with :class:`Cancelled`. ``on_step(done, total)`` reports progress.
    ``output_type="latent"`` returns the final latents instead (hires fix).
    """

    def call(noise: torch.Tensor, generators: list, embeds: dict, step_end, extra: dict):
        return pipe(
            **embeds,
            num_inference_steps=params.steps,
            guidance_scale=params.cfg_scale,
            width=params.width,
            height=params.height,
            latents=noise,
            generator=generators,
            callback_on_step_end=step_end,
            output_type=output_type,
            **extra,
        ).images

    latent_shape = (
        pipe.unet.config.in_channels,
        params.height // pipe.vae_scale_factor,
        params.width // pipe.vae_scale_factor,
    )
    return run_batches(pipe, base_scheduler_config, params, latent_shape, call, steps_run=params.steps, should_abort=should_abort, on_step=on_step)


def run_batches(
    pipe,
    base_scheduler_config: dict,
    params: Txt2ImgParams,
    latent_shape: tuple[int, int, int],
    call: Callable,
    *,
    steps_run: int,
    should_abort: Callable[[], bool] | None,
    on_step: Callable[[int, int], None] | None,
    schedule_steps: int | None = None,
) -> list[Image.Image]:
    """The batch loop txt2img and img2img share: seeded noise, a fresh scheduler and the conditioning per batch.

    ``call(noise, generators, embeds_kwargs, step_end, extra)`` runs the diffusers
    pipeline for one batch and returns its images; ``steps_run`` is how many
    sampling steps one batch takes (fewer than ``params.steps`` for img2img);
    prompt-editing schedules span ``schedule_steps`` (default ``params.steps``).
    """
    choice = resolve_sampler(params.sampler_name, params.schedule_type)
    device = pipe._execution_device
    dtype = pipe.unet.dtype
    total_steps = steps_run * params.n_iter
    images: list[Image.Image] = []
    schedule: ConditioningSchedule | None = None
    for it in range(params.n_iter):
        lo, hi = it * params.batch_size, (it + 1) * params.batch_size
        seeds = params.seeds[lo:hi]
        noise = batch_latents(seeds, params.subseeds[lo:hi], params.subseed_strength, latent_shape, device=device, dtype=dtype)
        # One generator per image for the sampler's own noise (ancestral/SDE), seeded like A1111.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        # a fresh scheduler per batch: SDE samplers seed their noise from the batch's first seed, as A1111
        pipe.scheduler = make_scheduler(choice, base_scheduler_config, seed=int(seeds[0]))
        if schedule is None:
            # Schedules count model calls, as A1111 does (x2 for second-order samplers).
            schedule = encode_prompts(
                pipe,
                params.prompt,
                params.negative_prompt,
                (schedule_steps or params.steps) * int(getattr(pipe.scheduler, "order", 1)),
                params.clip_stop_at_last_layers,
                sdxl_clip_l_skip=params.sdxl_clip_l_skip,
            )
        embeds = schedule.at(0).repeat(len(seeds))
        step_end = _step_callback(schedule, len(seeds), steps_run, it * steps_run, total_steps, should_abort, on_step)
        extra = {}
        if params.eta is not None and "eta" in _call_args(pipe):
            extra["eta"] = params.eta
        try:
            with torch.inference_mode():
                images.extend(call(noise, generators, _embeds_kwargs(embeds), step_end, extra))
        except Cancelled:
            raise
        except torch.OutOfMemoryError as exc:
            raise GenerationFailed(f"out of device memory at {params.width}x{params.height} batch {params.batch_size}: reduce size or batch_size") from exc
    return images


def _step_callback(schedule: ConditioningSchedule, batch: int, steps: int, done_before: int, total: int, should_abort, on_step):
    """diffusers' ``callback_on_step_end``: abort, progress, and the conditioning for the next call."""

    def step_end(pipe, step, _timestep, kwargs):
        if should_abort is not None and should_abort():
            raise Cancelled("job cancelled: the server is shutting down")
        if on_step is not None:
            # Loop iterations, not sampling steps: second-order samplers make ~2 per step.
            on_step(done_before + min(steps, (step + 1) * steps // max(1, pipe.num_timesteps)), total)
        if step + 1 in schedule.changes_at:
            kwargs.update(_loop_tensors(pipe, schedule.at(step + 1).repeat(batch)))
        return kwargs

    return step_end


def _embeds_kwargs(e: Embeds) -> dict:
    """Pipeline call arguments for ``e`` (pooled ones only for SDXL)."""
    kwargs = {"prompt_embeds": e.prompt_embeds, "negative_prompt_embeds": e.negative_prompt_embeds}
    if e.pooled is not None:
        kwargs["pooled_prompt_embeds"] = e.pooled
        kwargs["negative_pooled_prompt_embeds"] = e.negative_pooled
    return kwargs


def _loop_tensors(pipe, e: Embeds) -> dict:
    """``e`` as the denoising loop holds it: negative and positive concatenated under CFG."""

    def both(neg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return (torch.cat([neg, pos]) if pipe.do_classifier_free_guidance else pos).to(pipe._execution_device)

    tensors = {"prompt_embeds": both(e.negative_prompt_embeds, e.prompt_embeds)}
    if e.pooled is not None:
        tensors["add_text_embeds"] = both(e.negative_pooled, e.pooled)
    return tensors


def _call_args(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)
