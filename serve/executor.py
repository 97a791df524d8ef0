"""Runs jobs inside the worker process: fetch → load → generate → encode → upload.

This module lives on the worker side of the process boundary: it is imported
only by ``serve.child`` in the spawned worker, and it imports the torch world
(``pipelines``) lazily, so ``import serve.app`` stays torch-free.
"""

from __future__ import annotations

import base64
import gc
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import ModelNotFound, SDError
from serve.errors import clean_message
from serve.records import new_record, open_writer, utcnow
from serve.requests import Job
from serve.settings import Settings

log = logging.getLogger(__name__)

VERSION = "sd-endpoint-0.1.0"
CHECKPOINT_KIND = "Stable-diffusion"


@dataclass
class Active:
    """The checkpoint resident on the device, and what identifies its file."""

    key: tuple
    name: str
    loaded: Any  # pipelines.checkpoint.LoadedCheckpoint
    base_scheduler_config: dict
    sha256: str
    short_hash: str
    extras: Any  # serve.extras.ExtraNetworks


class Engine:
    """Owns the device, the model store and the resident pipeline; runs one job at a time."""

    def __init__(self, settings: Settings):
        import torch

        from model_cache.hashes import HashCache
        from model_cache.s3 import make_s3_client
        from model_cache.store import open_store

        self.settings = settings
        if settings.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = settings.device
        if settings.dtype == "auto":
            self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        else:
            self.dtype = getattr(torch, settings.dtype)
        self.store = open_store(
            settings.model_store,
            cache_dir=Path(settings.cache_dir),
            s3_client_factory=lambda: make_s3_client(settings.s3_endpoint_url, settings.aws_region),
        )
        self.hashes = HashCache(Path(settings.cache_dir))
        self.active: Active | None = None

    def describe(self) -> dict:
        import torch

        return {"device": self.device, "dtype": str(self.dtype).removeprefix("torch."), "torch": torch.__version__, "model_store": self.store.description}

    # -- one job -----------------------------------------------------------------------
    def run(self, job: Job, should_abort, on_progress=None) -> dict:
        """Run ``job`` to completion; returns the result dict or raises :class:`SDError` after recording the failure."""
        writer = open_writer(self.settings, job)
        record = new_record(job)
        timings: dict[str, float] = {}
        record["timings"] = timings
        writer.put_json(job.job_id, "job.json", record)
        try:
            with _phase(timings, "fetch"):
                ref, path = self._fetch(job.params.checkpoint)
            with _phase(timings, "load"):
                active = self._activate(ref, path)
                prepared = active.extras.prepare(job.params)
            record["checkpoint"] = active.name
            record["warnings"] += prepared.warnings
            with _phase(timings, "generate"):
                images = self._generate(active, job, prepared, should_abort, on_progress)
            with _phase(timings, "encode"):
                infotexts, pngs = self._encode(active, job, prepared, images)
            with _phase(timings, "upload"):
                keys = []
                for n, data in enumerate(pngs):
                    name = f"image-{n}.png"
                    writer.put_bytes(job.job_id, name, data, "image/png")
                    keys.append(writer.uri(job.job_id, name))
                writer.put_json(job.job_id, "params.json", self._params_record(job, active, ref, prepared))
        except Exception as exc:
            err = exc if isinstance(exc, SDError) else None
            if err is None:
                log.exception("job %s failed", job.job_id)
                err = SDError(clean_message(exc))
            record.update(status="failed", error=err.message, finished=utcnow())
            _safe_put(writer, job.job_id, record)
            raise err from None
        record.update(status="succeed", finished=utcnow(), progress=1.0, images=keys)
        writer.put_json(job.job_id, "job.json", record)
        return self._response(job, active, infotexts, pngs, record, prepared)

    def record_failure(self, job: Job, err: SDError) -> None:
        """Write a ``failed`` record for a job that never ran (e.g. drained at shutdown)."""
        record = new_record(job)
        record.update(status="failed", error=err.message, finished=utcnow())
        _safe_put(open_writer(self.settings, job), job.job_id, record)

    def _fetch(self, name: str | None):
        if name is None:
            refs = self.store.list(CHECKPOINT_KIND)
            if not refs:
                raise ModelNotFound(f"no checkpoint named in the request and none found in {self.store.description} ({CHECKPOINT_KIND}/)", field="override_settings.sd_model_checkpoint")
            ref = sorted(refs, key=lambda r: r.name)[0]
        else:
            ref = self.store.resolve(CHECKPOINT_KIND, name, field="override_settings.sd_model_checkpoint")
        return ref, self.store.fetch(ref)

    def _activate(self, ref, path: Path) -> Active:
        from pipelines.checkpoint import load_pipeline

        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, ref.etag)
        if self.active is not None and self.active.key == key:
            return self.active
        # Free the resident pipeline before loading the next one: two full models
        # side by side is what runs a small instance out of memory.
        self._release()
        sha256, short = self.hashes.file_hashes(path)
        from serve.extras import ExtraNetworks

        loaded = load_pipeline(path, device=self.device, dtype=self.dtype)
        stem = Path(ref.name).stem
        extras = ExtraNetworks(loaded, self.store, self.hashes, stem)
        self.active = Active(key, stem, loaded, dict(loaded.pipe.scheduler.config), sha256, short, extras)
        return self.active

    def _release(self) -> None:
        if self.active is None:
            return
        self.active = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generate(self, active: Active, job: Job, prepared, should_abort, on_progress):
        from dataclasses import replace

        from pipelines.txt2img import txt2img

        def on_step(done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(done / total)

        # the text encoder sees the prompt without its extra-network tags; the infotext keeps them (as A1111)
        params = replace(job.params, prompt=prepared.prompt, negative_prompt=prepared.negative_prompt)
        return txt2img(active.loaded.pipe, active.base_scheduler_config, params, should_abort=should_abort, on_step=on_step)

    def _encode(self, active: Active, job: Job, prepared, images) -> tuple[list[str], list[bytes]]:
        from pipelines.infotext import build_infotext, png_with_infotext

        infotexts, pngs = [], []
        for i, image in enumerate(images):
            text = build_infotext(job.params.prompt, job.params.negative_prompt, self._infotext_params(active, job, prepared, i))
            infotexts.append(text)
            pngs.append(png_with_infotext(image, text))
        return infotexts, pngs

    def _infotext_params(self, active: Active, job: Job, prepared, index: int) -> dict[str, Any]:
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
            extra={**dict(choice.infotext_extra), **prepared.infotext},
            version=VERSION,
        )

    def _params_record(self, job: Job, active: Active, ref, prepared) -> dict:
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
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "request": job.payload,
            "warnings": job.warnings + prepared.warnings,
        }

    def _response(self, job: Job, active: Active, infotexts: list[str], pngs: list[bytes], record: dict, prepared) -> dict:
        p = job.params
        info = {
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
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": record["started"],
            "version": VERSION,
        }
        inline = job.output.inline and job.send_images
        return {
            "images": [base64.b64encode(b).decode("ascii") for b in pngs] if inline else [],
            "info": json.dumps(info),
            "job": record,
            "warnings": prepared.warnings,
        }


@contextmanager
def _phase(timings: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 4)


def _safe_put(writer, job_id: str, record: dict) -> None:
    try:
        writer.put_json(job_id, "job.json", record)
    except Exception:
        log.exception("could not write the failed record of job %s", job_id)

