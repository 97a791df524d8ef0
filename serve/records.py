"""The job record (``job.json``), its index entry, and where a job's files go.

A record is rewritten whole at each transition (created → inprogress →
succeed/failed/cancelled); the images and ``params.json`` are written before the
final record, so a ``succeed`` record always points at files that exist. Each
transition also moves the job's index entry (:mod:`serve.jobs_index`): the new
entry is PUT first, then the old one DELETEd.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from serve.jobs_index import STATUS_ORDER, TERMINAL, index_key
from serve.requests import Job
from serve.settings import Settings

log = logging.getLogger(__name__)

CANCEL_MARKER = "cancel"
RUNNING_FILE = "running.json"
INTERRUPTED = "interrupted"


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def endpoint_name(settings: Settings) -> str | None:
    """The SageMaker endpoint this container serves, if known (setting ``endpoint_name`` or env)."""
    return settings.endpoint_name


def new_record(job: Job, *, status: str = "created", created: str | None = None, endpoint: str | None = None) -> dict[str, Any]:
    """A fresh record for ``job`` (``created`` now unless given)."""
    return {
        "id": job.job_id,
        "task": job.task,
        "status": status,
        "created": created or utcnow(),
        "started": None,
        "finished": None,
        "heartbeat": None,
        "progress": 0.0,
        "phase": None,
        "error": None,
        "checkpoint": job.params.checkpoint,
        "endpoint": endpoint,
        "instance": socket.gethostname(),
        "images": [],
        "timings": {},
        "warnings": list(job.warnings),
    }


def output_uri(settings: Settings, job: Job) -> str:
    """The job's output location: the envelope's ``output.uri`` or the ``OUTPUT`` setting."""
    return job.output.uri or settings.output


def open_writer_at(settings: Settings, uri: str):
    """An :class:`serve.outputs.OutputWriter` for ``uri``."""
    from model_cache.s3 import make_s3_client
    from serve.outputs import open_output

    return open_output(uri, s3_client_factory=lambda: make_s3_client(settings.s3_endpoint_url, settings.aws_region))


def open_writer(settings: Settings, job: Job):
    """An :class:`serve.outputs.OutputWriter` for the job's output location."""
    return open_writer_at(settings, output_uri(settings, job))


class JobRecorder:
    """Writes one job's record and index entry; thread-safe (a heartbeat thread shares it).

    Once the record is terminal, later heartbeats are dropped, so a late tick can
    never overwrite ``succeed``/``failed`` with ``inprogress``.
    """

    def __init__(self, writer, record: dict[str, Any], *, min_interval: float = 1.0, clock=time.monotonic):
        self.writer = writer
        self.record = record
        self.job_id = record["id"]
        self._indexed: str | None = None
        self._lock = threading.Lock()
        self._min_interval = min_interval
        self._clock = clock
        self._last_beat = float("-inf")

    @classmethod
    def open(cls, writer, job: Job, existing: dict | None, *, endpoint: str | None) -> "JobRecorder":
        """Start from the client's ``created`` record when there is one (keeping its time and extra fields)."""
        record = new_record(job, endpoint=endpoint)
        indexed = None
        if existing and existing.get("id") == job.job_id and existing.get("status") in STATUS_ORDER:
            record = {**existing, **{k: v for k, v in record.items() if k not in ("created", "endpoint")}}
            record["endpoint"] = existing.get("endpoint") or endpoint
            record["created"] = existing.get("created") or record["created"]
            try:
                indexed = index_key(existing)
            except (KeyError, ValueError):
                indexed = None
        rec = cls(writer, record)
        rec._indexed = indexed
        return rec

    @property
    def written(self) -> bool:
        """True once the job has an index entry (written by us or by the client)."""
        return self._indexed is not None

    @property
    def status(self) -> str:
        return self.record["status"]

    def transition(self, status: str, **fields: Any) -> None:
        """Move to ``status``: write the record, PUT the new index entry, DELETE the old one."""
        with self._lock:
            self.record.update(fields, status=status)
            if status in TERMINAL:
                self.record.setdefault("finished", None)
                self.record["finished"] = self.record["finished"] or utcnow()
            self.writer.put_json(self.job_id, "job.json", self.record)
            self._last_beat = self._clock()
            self._reindex()

    def _reindex(self) -> None:
        key = index_key(self.record)
        if key == self._indexed:
            return
        self.writer.put_key(key)
        if self._indexed is not None:
            try:
                self.writer.delete_key(self._indexed)
            except Exception:  # readers dedup; a stale entry is harmless
                log.warning("could not delete index entry %s", self._indexed, exc_info=True)
        self._indexed = key

    def heartbeat(self, progress: float | None = None, *, force: bool = False) -> bool:
        """Rewrite ``heartbeat`` (and ``progress``) at most once per ``min_interval``; True if written."""
        with self._lock:
            if self.record["status"] != "inprogress":
                return False
            now = self._clock()
            if progress is not None:
                self.record["progress"] = round(progress, 4)
            if not force and now - self._last_beat < self._min_interval:
                return False
            self._last_beat = now
            self.record["heartbeat"] = utcnow()
            try:
                self.writer.put_json(self.job_id, "job.json", self.record)
            except Exception:  # a missed heartbeat is not a failed job
                log.warning("could not write the heartbeat of job %s", self.job_id, exc_info=True)
                return False
            return True

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.record["phase"] = phase


class Heartbeat:
    """A daemon thread that keeps the record's heartbeat fresh during long fetches and loads."""

    def __init__(self, recorder: JobRecorder, every: float = 5.0):
        self._recorder, self._every = recorder, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{recorder.job_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self._recorder.heartbeat()


class RunningFile:
    """``<CACHE_DIR>/running.json``: which job this worker is running, so a restart can fail it."""

    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / RUNNING_FILE

    def write(self, job_id: str, uri: str, phase: str | None = None) -> None:
        from model_cache.atomic import write_bytes_atomic

        write_bytes_atomic(self.path, json.dumps({"id": job_id, "output": uri, "phase": phase}).encode())

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("unreadable %s: ignored", self.path)
            return {}

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def fail_from_outside(writer, job_id: str, reason: str, *, phase: str | None = None, job: Job | None = None) -> dict | None:
    """Mark a job failed when its worker died before it could say so itself; returns the record written.

    A record that is already terminal is left alone.
    """
    existing = writer.get_json(job_id, "job.json")
    if existing is None and job is None:
        return None
    if existing is not None and existing.get("status") in TERMINAL:
        return None
    rec = JobRecorder.open(writer, job, existing, endpoint=None) if job is not None else JobRecorder(writer, dict(existing))
    if job is None:
        try:
            rec._indexed = index_key(existing)
        except (KeyError, ValueError):
            rec._indexed = None
    rec.transition("failed", error=reason, phase=phase or rec.record.get("phase"), finished=utcnow())
    return rec.record


def fail_record_from_outside(settings: Settings, job: Job, reason: str) -> None:
    """The HTTP side's variant: the worker process died mid-job."""
    running = RunningFile(settings.cache_dir).read() or {}
    phase = running.get("phase") if running.get("id") == job.job_id else None
    fail_from_outside(open_writer(settings, job), job.job_id, reason, phase=phase, job=job)


def recover_interrupted(settings: Settings) -> dict | None:
    """At worker start-up: fail the job a previous worker left running (``running.json``), then forget it."""
    running_file = RunningFile(settings.cache_dir)
    running = running_file.read()
    if running is None:
        return None
    record = None
    try:
        if running.get("id") and running.get("output"):
            writer = open_writer_at(settings, running["output"])
            record = fail_from_outside(writer, running["id"], INTERRUPTED, phase=running.get("phase"))
            if record is not None:
                log.warning("job %s was interrupted by a restart (phase %s): marked failed", running["id"], running.get("phase"))
    except Exception:
        log.exception("could not mark interrupted job %s failed", running.get("id"))
    running_file.clear()
    return record
