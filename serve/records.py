"""The job record (``job.json``) and where a job's files go.

A record is rewritten whole at each transition (inprogress → succeed/failed);
the images and ``params.json`` are written before the final record, so a
``succeed`` record always points at files that exist.
"""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from typing import Any

from serve.requests import Job
from serve.settings import Settings


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_record(job: Job) -> dict[str, Any]:
    """A fresh ``inprogress`` record for ``job``."""
    now = utcnow()
    return {
        "id": job.job_id,
        "task": job.task,
        "status": "inprogress",
        "created": now,
        "started": now,
        "finished": None,
        "progress": 0.0,
        "error": None,
        "checkpoint": job.params.checkpoint,
        "instance": socket.gethostname(),
        "images": [],
        "timings": {},
        "warnings": list(job.warnings),
    }


def output_uri(settings: Settings, job: Job) -> str:
    """The job's output location: the envelope's ``output.uri`` or the ``OUTPUT`` setting."""
    return job.output.uri or settings.output


def open_writer(settings: Settings, job: Job):
    """An :class:`serve.outputs.OutputWriter` for the job's output location."""
    from model_cache.s3 import make_s3_client
    from serve.outputs import open_output

    return open_output(
        output_uri(settings, job),
        s3_client_factory=lambda: make_s3_client(settings.s3_endpoint_url, settings.aws_region),
    )


def fail_record_from_outside(settings: Settings, job: Job, reason: str) -> None:
    """Mark a job failed when its worker died before it could say so itself."""
    writer = open_writer(settings, job)
    record = writer.get_json(job.job_id, "job.json") or new_record(job)
    if record.get("status") in ("succeed", "failed"):
        return
    record.update(status="failed", error=reason, finished=utcnow())
    writer.put_json(job.job_id, "job.json", record)
