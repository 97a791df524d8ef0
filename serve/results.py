"""What a finished job produces: PNGs with A1111 infotext, A1111's ``info``, ``params.json``, the answer.

Worker side (imported by ``serve.executor``); the ``pipelines`` imports stay lazy.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from serve.requests import Job

VERSION = "sd-endpoint-0.1.0"


def encode_images(active, job: Job, prepared, images) -> tuple[list[str], list[bytes]]:
    """PNG bytes with A1111 infotext for each generated image, and the infotexts."""
    from pipelines.infotext import build_infotext, png_with_infotext

    infotexts, pngs = [], []
    for i, image in enumerate(images):
        text = build_infotext(job.params.prompt, job.params.negative_prompt, infotext_params(active, job, prepared, i))
        infotexts.append(text)
        pngs.append(png_with_infotext(image, text))
    return infotexts, pngs

def infotext_params(active, job: Job, prepared, index: int) -> dict[str, Any]:
    """Image ``index``'s generation parameters in A1111's order."""
    from pipelines.infotext import a1111_params
    from pipelines.samplers import resolve_sampler

    p = job.params
    choice = resolve_sampler(p.sampler_name, p.schedule_type)
    return a1111_params(
        steps=p.steps,
        sampler=p.sampler_name,
        schedule=p.schedule_type,
        cfg_scale=p.cfg_scale,
        seed=p.seeds[index],
        width=p.width,
        height=p.height,
        model_hash=active.short_hash,
        model=active.name,
        vae_hash=prepared.vae_infotext.get("VAE hash"),
        vae=prepared.vae_infotext.get("VAE"),
        variation_seed=p.subseeds[index],
        variation_seed_strength=p.subseed_strength,
        clip_skip=p.clip_stop_at_last_layers,
        denoising_strength=p.hires.denoising_strength if p.hires else getattr(p, "denoising_strength", None),
        extra={**dict(choice.infotext_extra), **_img2img_infotext(p), **_hires_infotext(p), **prepared.infotext},
        version=VERSION,
    )

def params_record(job: Job, active, ref, prepared, *, device: str, dtype: str) -> dict:
    """``params.json``: the request as resolved, every model with its hashes."""
    loaded = active.loaded
    return {
        "job_id": job.job_id,
        "task": job.task,
        "params": job.params.to_dict(),
        "checkpoint": {
            "name": ref.name,
            "location": ref.location,
            "short_hash": active.short_hash,
            "sha256": active.sha256,
            "family": loaded.family,
            "prediction_type": loaded.prediction_type,
        },
        "networks": prepared.records,
        "device": device,
        "dtype": dtype,
        "request": job.payload,
        "models": job.models.as_dict(),
        "image_sources": job.image_sources,
        "warnings": job.warnings + prepared.warnings,
    }

def a1111_info(active, job: Job, infotexts: list[str], record: dict) -> dict:
    """A1111's ``info`` object (kept in ``params.json`` so a replay can answer with it)."""
    p = job.params
    return {
        "prompt": p.prompt,
        "all_prompts": [p.prompt] * p.image_count,
        "negative_prompt": p.negative_prompt,
        "all_negative_prompts": [p.negative_prompt] * p.image_count,
        "seed": p.seeds[0],
        "all_seeds": p.seeds,
        "subseed": p.subseeds[0],
        "all_subseeds": p.subseeds,
        "subseed_strength": p.subseed_strength,
        "width": p.width,
        "height": p.height,
        "sampler_name": p.sampler_name,
        "scheduler": p.schedule_type,
        "cfg_scale": p.cfg_scale,
        "steps": p.steps,
        "batch_size": p.batch_size,
        "n_iter": p.n_iter,
        "sd_model_name": active.name,
        "sd_model_hash": active.short_hash,
        "clip_skip": p.clip_stop_at_last_layers,
        "denoising_strength": getattr(p, "denoising_strength", 0),
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": record["started"],
        "version": VERSION,
    }

def response(job: Job, pngs: list[bytes], info: dict, record: dict, warnings: list[str]) -> dict:
    """The answer: A1111's shape (images inline unless the job writes them elsewhere) plus the record and warnings."""
    inline = job.output.inline and job.send_images
    return {
        "images": [base64.b64encode(b).decode("ascii") for b in pngs] if inline else [],
        "info": json.dumps(info),
        "job": record,
        "warnings": warnings,
    }


def _hires_infotext(p) -> dict[str, Any]:
    """A1111's hires-fix infotext fields (only those that differ from the first pass, as A1111)."""
    hr = getattr(p, "hires", None)
    if hr is None:
        return {}
    extra: dict[str, Any] = {}
    if hr.prompt != p.prompt:
        extra["Hires prompt"] = hr.prompt
    if hr.negative_prompt != p.negative_prompt:
        extra["Hires negative prompt"] = hr.negative_prompt
    if hr.resize is None:
        extra["Hires upscale"] = hr.scale
    else:
        extra["Hires resize"] = f"{hr.resize[0]}x{hr.resize[1]}"
    if hr.second_pass_steps:
        extra["Hires steps"] = hr.second_pass_steps
    extra["Hires upscaler"] = hr.upscaler
    if hr.sampler_name != p.sampler_name:
        extra["Hires sampler"] = hr.sampler_name
    if hr.schedule_type != p.schedule_type:
        extra["Hires schedule type"] = hr.schedule_type
    return extra


def _img2img_infotext(p) -> dict[str, Any]:
    """What A1111 adds to the infotext of an inpainting job (a plain img2img adds only the strength)."""
    if getattr(p, "mask", None) is None:
        return {}
    extra: dict[str, Any] = {"Mask blur": p.mask_blur}
    if p.inpaint_full_res:
        extra["Inpaint area"] = "Only masked"
        extra["Masked area padding"] = p.inpaint_full_res_padding
    return extra
