"""Runs jobs inside the worker process: fetch → load → generate → encode → upload.

This module lives on the worker side of the process boundary: it is imported
only by ``serve.child`` in the spawned worker, and it imports the torch world
(``pipelines``) lazily, so ``import serve.app`` stays torch-free.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import Cancelled, ModelNotFound, SDError
from serve.control import prepare_for_job
from serve.errors import clean_message
from serve.jobs_index import TERMINAL
from serve.records import (
    CANCEL_MARKER,
    Heartbeat,
    JobRecorder,
    RunningFile,
    endpoint_name,
    open_writer,
    output_uri,
    utcnow,
)
from serve.requests import Job
from serve.results import a1111_info, encode_images, params_record, response
from serve.settings import Settings

log = logging.getLogger(__name__)

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
        from model_cache.access import parse_prefixes
        from model_cache.hashes import HashCache
        from model_cache.s3 import make_s3_client
        from model_cache.store import open_store
        from model_cache.transfer import TransferConfig
        from pipelines.device import resolve_device, resolve_dtype

        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.store = open_store(
            settings.model_store,
            cache_dir=Path(settings.cache_dir),
            s3_client_factory=lambda: make_s3_client(settings.s3_endpoint_url, settings.aws_region),
            disk_budget=settings.cache_disk_budget,
            min_free=settings.cache_min_free,
            transfer_config=TransferConfig(concurrency=settings.s3_concurrency, readers=settings.s3_readers, part_size=settings.s3_part_size, retries=settings.s3_retries),
            allowed_s3_prefixes=parse_prefixes(settings.allowed_s3_prefixes),
            metadata_ttl=settings.model_list_ttl,
        )
        self.hashes = HashCache(Path(settings.cache_dir))
        self.active: Active | None = None
        self.controlnets = None  # serve.control.ControlNets, built by the first job with ControlNet units
        self._cache = None  # pipelines.residency.PipelineCache (see _models)
        self._pinned: tuple | None = None  # key of the checkpoint the current/last job uses
        self.last_cache = None  # model_cache.residency.Event of the last activation
        self.models()  # budgets resolved (and logged) at start-up; GET /cache shows them before any job

    def describe(self) -> dict:
        from pipelines.device import dtype_name, torch_version

        return {"device": self.device, "dtype": dtype_name(self.dtype), "torch": torch_version(), "model_store": self.store.description}

    # -- one job -----------------------------------------------------------------------
    def run(self, job: Job, should_abort, on_progress=None) -> dict:
        """Run ``job`` to completion; returns the result dict or raises :class:`SDError` after recording the failure.

        A job id whose record already says ``succeed`` is answered from storage
        (SageMaker async may deliver a request twice); a ``cancel`` marker stops the
        job before it starts or at the next denoising step (checked at most once a second).
        """
        writer = open_writer(self.settings, job)
        existing = writer.get_json(job.job_id, "job.json")
        if existing is not None and existing.get("status") == "succeed":
            log.info("job %s already succeeded: answering from %s", job.job_id, writer.description)
            return self._replay(job, writer, existing)
        recorder = JobRecorder.open(writer, job, existing, endpoint=endpoint_name(self.settings))
        record = recorder.record
        timings: dict[str, float] = {}
        record["timings"] = timings
        running = RunningFile(self.settings.cache_dir)
        running.write(job.job_id, output_uri(self.settings, job))
        watch = _CancelWatch(writer, job.job_id, should_abort)
        phase = _Phases(recorder, running, job.job_id, output_uri(self.settings, job), timings)
        try:
            if not recorder.written:  # no client-written record: the container says "created" itself
                recorder.transition("created")
            if watch.marker_present():
                recorder.transition("cancelled", error="cancelled before it started", progress=0.0)
                raise Cancelled(f"job {job.job_id} was cancelled before it started")
            recorder.transition("inprogress", started=utcnow(), heartbeat=utcnow())

            def progress(fraction: float) -> None:
                recorder.heartbeat(fraction)
                if on_progress is not None:
                    on_progress(fraction)

            # files this job fetched stay pinned on disk until it ends; the request's explicit S3 locations are visible to it
            with Heartbeat(recorder), self.store.job_scope(), self.store.explicit(job.models):
                with phase("fetch"):
                    ref, path = self._fetch(job.params.checkpoint)
                with phase("load"):
                    active = self._activate(ref, path)
                    prepared = active.extras.prepare(job.params)
                    control = prepare_for_job(self, job, active, prepared)  # ControlNet units: models, preprocessors
                    record["cache"] = self.cache_record()
                record["checkpoint"] = active.name
                record["warnings"] += prepared.warnings
                with phase("generate"), control.hook(active.loaded.pipe):
                    images = self._generate(active, job, prepared, watch, progress)
                with phase("encode"):
                    infotexts, pngs = encode_images(active, job, prepared, images)
                with phase("upload"):
                    keys = []
                    for n, data in enumerate(pngs):
                        name = f"image-{n}.png"
                        writer.put_bytes(job.job_id, name, data, "image/png")
                        keys.append(writer.uri(job.job_id, name))
                    for name, data in control.maps:  # detected maps follow the images, as the extension returns them
                        writer.put_bytes(job.job_id, name, data, "image/png")
                        keys.append(writer.uri(job.job_id, name))
                    pngs = pngs + [data for _, data in control.maps]
                    info = a1111_info(active, job, infotexts, record)
                    writer.put_json(job.job_id, "params.json", {**params_record(job, active, ref, prepared, device=self.device, dtype=self.describe()["dtype"]), "info": info})
        except Exception as exc:
            err = exc if isinstance(exc, SDError) else None
            if err is None:
                log.exception("job %s failed", job.job_id)
                err = SDError(clean_message(exc))
            if recorder.status not in TERMINAL:
                if isinstance(err, Cancelled) and watch.by_marker:
                    err = Cancelled(f"job {job.job_id} was cancelled (cancel marker)")
                    _safe_transition(recorder, "cancelled", error=err.message, phase=phase.current)
                else:
                    _safe_transition(recorder, "failed", error=err.message, phase=phase.current)
            running.clear()
            raise err from None
        recorder.transition("succeed", finished=utcnow(), progress=1.0, images=keys, phase=None, heartbeat=utcnow())
        running.clear()
        return response(job, pngs, info, record, prepared.warnings)

    def _replay(self, job: Job, writer, record: dict) -> dict:
        """The result of a job that already succeeded, read back from its output location."""
        params = writer.get_json(job.job_id, "params.json") or {}
        info = params.get("info") or {}
        pngs: list[bytes] = []
        if job.output.inline and job.send_images:
            for uri in record.get("images", []):
                data = writer.get_bytes(job.job_id, uri.rsplit("/", 1)[-1])
                if data is not None:
                    pngs.append(data)
        return {**response(job, pngs, info, record, list(params.get("warnings") or [])), "replayed": True}

    def record_failure(self, job: Job, err: SDError) -> None:
        """Write a ``failed`` record for a job that never ran (e.g. drained at shutdown)."""
        writer = open_writer(self.settings, job)
        try:
            existing = writer.get_json(job.job_id, "job.json")
            if existing is not None and existing.get("status") in TERMINAL:
                return
            recorder = JobRecorder.open(writer, job, existing, endpoint=endpoint_name(self.settings))
            recorder.transition("failed", error=err.message, finished=utcnow())
        except Exception:
            log.exception("could not write the failed record of job %s", job.job_id)

    def _fetch(self, name: str | None):
        if name is None:
            refs = self.store.list(CHECKPOINT_KIND)
            if not refs:
                raise ModelNotFound(f"no checkpoint named in the request and none found in {self.store.description} ({CHECKPOINT_KIND}/)", field="override_settings.sd_model_checkpoint")
            ref = min(refs, key=lambda r: r.name)
        else:
            ref = self.store.resolve(CHECKPOINT_KIND, name, field="override_settings.sd_model_checkpoint")
        return ref, self.store.fetch(ref)

    # -- resident checkpoints (model cache: RAM and VRAM tiers) ------------------------------
    def models(self):
        """The model cache's RAM and VRAM tiers (checkpoints with their extra networks, and ControlNets), built on first use."""
        if self._cache is None:
            from pipelines import memory
            from pipelines.residency import PipelineCache, attached_modules

            def modules_of(value):
                if not isinstance(value, Active):  # a ControlNet (serve.control)
                    return [value.model]
                return memory.pipeline_modules(value.loaded.pipe) + attached_modules(value.extras)

            self._cache = PipelineCache.for_machine(device=self.device, ram_setting=self.settings.cache_ram_budget,
                                                    vram_setting=self.settings.cache_vram_budget, modules_of=modules_of,
                                                    on_drop=_forget)
        return self._cache

    def _activate(self, ref, path: Path) -> Active:
        from pipelines.memory import estimate_bytes

        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, ref.etag)
        cache = self.models()
        if self._pinned is not None:  # the previous job is over: its checkpoint may be evicted now
            cache.release(self._pinned)
            self._pinned = None
        if self.controlnets is not None:  # and its ControlNets, before this job's checkpoint needs the room
            self.controlnets.release()
        stem = Path(ref.name).stem
        active, event = cache.acquire(key, lambda: self._load(ref, path, key, stem), estimate=estimate_bytes(path, self.dtype), label=stem)
        self._pinned = key
        self.active = active
        self.last_cache = event
        log.info("checkpoint %s: %s %s%s", stem, "loaded from file" if event.source == "load" else f"{event.source} hit",
                 event.times, f", evicted {[e['name'] for e in event.evicted]}" if event.evicted else "")
        return active

    def _load(self, ref, path: Path, key: tuple, stem: str) -> Active:
        """Read a checkpoint from its file: the sha256 (first time only) is computed beside the load, on the other core."""
        from concurrent.futures import ThreadPoolExecutor

        from pipelines.checkpoint import load_pipeline
        from serve.extras import ExtraNetworks

        with ThreadPoolExecutor(1, thread_name_prefix="sd-hash") as pool:
            hashes = pool.submit(self.hashes.file_hashes, path)
            loaded = load_pipeline(path, device=self.device, dtype=self.dtype)
            sha256, short = hashes.result()
        self.models().share(loaded.pipe)
        extras = ExtraNetworks(loaded, self.store, self.hashes, stem)
        return Active(key, stem, loaded, dict(loaded.pipe.scheduler.config), sha256, short, extras)

    def cache_record(self) -> dict:
        """The ``cache`` field of ``job.json``: what the checkpoint cost this job, and each tier's counters."""
        if self._cache is None or self.last_cache is None or self._pinned is None:
            return {}
        out = self._cache.job_record(self._pinned, self.last_cache)
        if self.controlnets is not None and self.controlnets.events:
            out["controlnets"] = self.controlnets.events
        return out

    def cache_snapshot(self) -> dict:
        """What ``GET /cache`` shows: the RAM/VRAM tiers, and the disk tier when the store has one."""
        out: dict = {"memory": self._cache.snapshot() if self._cache is not None else None, "disk": None}
        if callable(getattr(self.store, "cache_stats", None)):  # the store's disk tier (S3 stores; local: none)
            try:
                out["disk"] = {**self.store.cache_stats(), "entries": self.store.cache_snapshot()}
            except Exception:  # visibility must not break the worker
                log.warning("disk cache snapshot failed", exc_info=True)
        return out

    def _release(self) -> None:
        """Drop every cached checkpoint not in use and give the memory back."""
        if self.controlnets is not None:
            self.controlnets.release()
        if self._cache is not None:
            if self._pinned is not None:
                self._cache.release(self._pinned)
                self._pinned = None
            self._cache.clear()
        self.active = None

    def _generate(self, active: Active, job: Job, prepared, should_abort, on_progress):
        from dataclasses import replace

        from pipelines.txt2img import txt2img

        def on_step(done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(done / total)

        # the text encoder sees the prompt without its extra-network tags; the infotext keeps them (as A1111)
        params = replace(job.params, prompt=prepared.prompt, negative_prompt=prepared.negative_prompt)
        if job.task == "img2img":
            from pipelines.img2img import img2img

            return img2img(active.loaded.pipe, active.base_scheduler_config, params, should_abort=should_abort, on_step=on_step)
        if params.hires is not None:
            from pipelines.hires import txt2img_hires

            params = replace(params, hires=_hires_prompts(params.hires, job.params, prepared))
            return txt2img_hires(active.loaded.pipe, active.base_scheduler_config, params, should_abort=should_abort, on_step=on_step)
        return txt2img(active.loaded.pipe, active.base_scheduler_config, params, should_abort=should_abort, on_step=on_step)

def _hires_prompts(hires, original, prepared):
    """The second pass's prompts as the text encoder sees them: without extra-network tags."""
    from dataclasses import replace

    from pipelines.prompt import extract_networks

    prompt = prepared.prompt if hires.prompt == original.prompt else extract_networks(hires.prompt)[0]
    negative = prepared.negative_prompt if hires.negative_prompt == original.negative_prompt else hires.negative_prompt
    return replace(hires, prompt=prompt, negative_prompt=negative)


class _CancelWatch:
    """``should_abort`` for the pipeline: the shutdown flag, or the job's ``cancel`` marker (≤ 1 HEAD/s)."""

    def __init__(self, writer, job_id: str, should_abort, every: float = 1.0, clock=time.monotonic):
        self._writer, self._job_id, self._abort = writer, job_id, should_abort
        self._every, self._clock = every, clock
        self._last = float("-inf")
        self.by_marker = False

    def marker_present(self) -> bool:
        try:
            present = self._writer.exists(self._job_id, CANCEL_MARKER)
        except Exception:  # a storage hiccup must not kill the job
            log.warning("could not check the cancel marker of job %s", self._job_id, exc_info=True)
            return False
        self.by_marker = self.by_marker or present
        return present

    def __call__(self) -> bool:
        if self._abort is not None and self._abort():
            return True
        now = self._clock()
        if now - self._last >= self._every:
            self._last = now
            return self.marker_present()
        return False


class _Phases:
    """``with phase("load"):`` times the phase and records it in the record and ``running.json``."""

    def __init__(self, recorder: JobRecorder, running: RunningFile, job_id: str, uri: str, timings: dict[str, float]):
        self._recorder, self._running, self._job_id, self._uri, self._timings = recorder, running, job_id, uri, timings
        self.current: str | None = None

    @contextmanager
    def __call__(self, name: str):
        self.current = name
        self._recorder.set_phase(name)
        try:
            self._running.write(self._job_id, self._uri, name)
        except OSError:
            log.warning("could not update %s", self._running.path, exc_info=True)
        with _phase(self._timings, name):
            yield


@contextmanager
def _phase(timings: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 4)


def _forget(active) -> None:
    """A checkpoint leaves the cache: cut the references its managers hold so nothing keeps the weights alive."""
    if not isinstance(active, Active):  # a ControlNet: its module is all it holds
        return
    active.extras = None
    active.loaded = None


def _safe_transition(recorder: JobRecorder, status: str, **fields) -> None:
    try:
        recorder.transition(status, **fields)
    except Exception:
        log.exception("could not write the %s record of job %s", status, recorder.job_id)

