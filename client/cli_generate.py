"""`sdctl txt2img`, `sdctl img2img` and `sdctl submit`: build the A1111 body and send it.

Sync (``--local URL``: a ``docker run``/``make serve`` instance or a real-time
endpoint's URL) waits for the images; async (``--endpoint NAME``) records the job,
uploads ``input.json`` and calls ``InvokeEndpointAsync``, printing the job id at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from client.cli_common import handled
from client.config import EXIT_USAGE, CliError, Config

_SAMPLER_HELP = "A1111 sampler name, e.g. 'DPM++ 2M'."
_CN_HELP = "A ControlNet unit JSON file (sd-webui-controlnet API fields); repeatable, at most 10."


def _run(ctx: typer.Context, task: str, payload: dict, job_id: str | None, local: str | None,
         endpoint: str | None, out: Path | None) -> None:
    from client.submit import new_job_id, submit_async, submit_local

    if bool(local) == bool(endpoint):
        raise CliError("give exactly one target: --local URL (sync) or --endpoint NAME (SageMaker async)", EXIT_USAGE)
    job_id = new_job_id(job_id)
    if local:
        job_id, saved = submit_local(local, task, job_id, payload, out or Path(job_id))
        for path in saved:
            typer.echo(f"saved {path}", err=True)
        typer.echo(job_id)
        return
    typer.echo(submit_async(ctx.obj, endpoint, task, job_id, payload))


# A1111 flags shared by txt2img and img2img
OptNegative = Annotated[str | None, typer.Option("--negative")]
OptSampler = Annotated[str | None, typer.Option("--sampler", help=_SAMPLER_HELP)]
OptScheduler = Annotated[str | None, typer.Option("--scheduler", help="Schedule type, e.g. Karras.")]
OptSteps = Annotated[int | None, typer.Option("--steps")]
OptCfg = Annotated[float | None, typer.Option("--cfg")]
OptWidth = Annotated[int | None, typer.Option("--width")]
OptHeight = Annotated[int | None, typer.Option("--height")]
OptSeed = Annotated[int | None, typer.Option("--seed")]
OptBatch = Annotated[int | None, typer.Option("--batch")]
OptNIter = Annotated[int | None, typer.Option("--n-iter")]
OptCheckpoint = Annotated[str | None, typer.Option("--checkpoint")]
OptVae = Annotated[str | None, typer.Option("--vae")]
OptClipSkip = Annotated[int | None, typer.Option("--clip-skip")]
OptLora = Annotated[list[str] | None, typer.Option("--lora", help="name:weight, repeatable.")]


def txt2img(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Option("--prompt", "-p")],
    negative: OptNegative = None,
    sampler: OptSampler = None,
    scheduler: OptScheduler = None,
    steps: OptSteps = None,
    cfg: OptCfg = None,
    width: OptWidth = None,
    height: OptHeight = None,
    seed: OptSeed = None,
    batch: OptBatch = None,
    n_iter: OptNIter = None,
    checkpoint: OptCheckpoint = None,
    vae: OptVae = None,
    clip_skip: OptClipSkip = None,
    lora: OptLora = None,
    controlnet: Annotated[list[Path] | None, typer.Option("--controlnet", help=_CN_HELP)] = None,
    local: Annotated[str | None, typer.Option("--local", help="Server URL for a synchronous run.")] = None,
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="SageMaker async endpoint name.")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="--local: folder for the images (default ./<job id>).")] = None,
    job_id: Annotated[str | None, typer.Option("--id", help="Job id (default: a new UUID).")] = None,
):
    """Text to image with A1111 flags; prints the job id."""
    from client.controlnet import attach, load_units
    from client.submit import txt2img_payload

    payload = txt2img_payload(
        prompt=prompt, negative=negative, sampler=sampler, scheduler=scheduler, steps=steps, cfg=cfg, width=width,
        height=height, seed=seed, batch=batch, n_iter=n_iter, checkpoint=checkpoint, vae=vae, clip_skip=clip_skip,
        loras=lora or [],
    )
    _run(ctx, "txt2img", attach(payload, load_units(controlnet)), job_id, local, endpoint, out)


def img2img(
    ctx: typer.Context,
    init_image: Annotated[list[Path] | None, typer.Option("--init-image", "-i", help="Start image (PNG, JPEG, WebP, …); one per request.")] = None,
    from_job: Annotated[str | None, typer.Option("--from-job", help="JOB[:n]: start from image n (default 0) of a job and its parameters.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Default: the --from-job prompt, else empty.")] = None,
    negative: OptNegative = None,
    sampler: OptSampler = None,
    scheduler: OptScheduler = None,
    steps: OptSteps = None,
    cfg: OptCfg = None,
    width: OptWidth = None,
    height: OptHeight = None,
    seed: OptSeed = None,
    batch: OptBatch = None,
    n_iter: OptNIter = None,
    checkpoint: OptCheckpoint = None,
    vae: OptVae = None,
    clip_skip: OptClipSkip = None,
    lora: OptLora = None,
    denoising_strength: Annotated[float | None, typer.Option("--denoising-strength", "--denoise", help="0-1 (A1111 default 0.75).")] = None,
    resize_mode: Annotated[str | None, typer.Option("--resize-mode", help="0 Just resize, 1 Crop and resize, 2 Resize and fill, 3 Just resize (latent upscale).")] = None,
    mask: Annotated[Path | None, typer.Option("--mask", help="Inpainting mask image (white = repaint).")] = None,
    mask_blur: Annotated[int | None, typer.Option("--mask-blur")] = None,
    inpainting_fill: Annotated[str | None, typer.Option("--inpainting-fill", help="Masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing.")] = None,
    inpaint_full_res: Annotated[bool | None, typer.Option("--inpaint-full-res/--inpaint-whole-picture", help="Inpaint area: only masked / whole picture.")] = None,
    inpaint_full_res_padding: Annotated[int | None, typer.Option("--inpaint-full-res-padding", help="Only-masked padding, pixels.")] = None,
    inpainting_mask_invert: Annotated[bool | None, typer.Option("--inpainting-mask-invert", help="Inpaint not masked.", show_default=False)] = None,
    controlnet: Annotated[list[Path] | None, typer.Option("--controlnet", help=_CN_HELP)] = None,
    local: Annotated[str | None, typer.Option("--local", help="Server URL for a synchronous run.")] = None,
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="SageMaker async endpoint name.")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="--local: folder for the images (default ./<job id>).")] = None,
    job_id: Annotated[str | None, typer.Option("--id", help="Job id (default: a new UUID).")] = None,
):
    """Image to image (and inpainting) with A1111 flags; --from-job JOB[:n] sends a job's image and parameters."""
    from client.controlnet import attach, load_units
    from client.img2img import (
        INPAINTING_FILLS,
        RESIZE_MODES,
        choice,
        img2img_payload,
        job_start,
        read_image_b64,
    )
    from client.jobs import JobStore
    from client.storage import open_location
    from client.submit import txt2img_payload

    given = {"prompt": prompt, "negative": negative, "sampler": sampler, "scheduler": scheduler, "steps": steps, "cfg": cfg,
             "width": width, "height": height, "seed": seed, "batch": batch, "n_iter": n_iter, "checkpoint": checkpoint,
             "vae": vae, "clip_skip": clip_skip}
    # local checks first: a bad flag should not cost a read of the job store
    resize = choice(resize_mode, RESIZE_MODES, "--resize-mode")
    fill = choice(inpainting_fill, INPAINTING_FILLS, "--inpainting-fill")
    images = [read_image_b64(p, "--init-image") for p in init_image or []]
    mask_b64 = read_image_b64(mask, "--mask") if mask is not None else None
    units = load_units(controlnet)
    defaults, extra = {}, {}
    if from_job:
        config: Config = ctx.obj
        start = job_start(JobStore(open_location(config.require_output(), config.s3)), from_job)
        defaults, extra = start.defaults, start.extra
        if not images:  # an explicit --init-image wins over the job's image
            images = [start.image_b64]
    merged = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    merged.setdefault("prompt", "")
    base = txt2img_payload(**merged, loras=lora or [])
    payload = img2img_payload(
        base, images,
        denoising_strength=denoising_strength if denoising_strength is not None else extra.get("denoising_strength"),
        resize_mode=resize if resize is not None else extra.get("resize_mode"),
        mask=mask_b64, mask_blur=mask_blur, inpainting_fill=fill, inpaint_full_res=inpaint_full_res,
        inpaint_full_res_padding=inpaint_full_res_padding,
        inpainting_mask_invert=inpainting_mask_invert or None,
    )
    _run(ctx, "img2img", attach(payload, units), job_id, local, endpoint, out)


def submit(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="An A1111 payload or an envelope {task, id, payload}.")],
    local: Annotated[str | None, typer.Option("--local", help="Server URL for a synchronous run.")] = None,
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="SageMaker async endpoint name.")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="--local: folder for the images.")] = None,
):
    """Submit a JSON request file; prints the job id."""
    from client.submit import read_request_file

    task, payload, job_id = read_request_file(file)
    _run(ctx, task, payload, job_id, local, endpoint, out)


def register(app: typer.Typer) -> None:
    """Add the generation commands to ``app``."""
    for command in (txt2img, img2img, submit):
        app.command(command.__name__)(handled(command))
