"""The one place where failures become HTTP answers.

Every non-2xx body has the same shape (:class:`serve.schemas.ErrorBody`):
``{"error": kind, "detail": message, "field": ..., "job_id": ...}``. Messages
are cleaned of memory addresses and never carry a traceback; unexpected
exceptions are logged once, with their traceback, here.
"""

from __future__ import annotations

import logging
import re

from fastapi import Request
from fastapi.responses import JSONResponse

from pipelines.errors import (
    Cancelled,
    Forbidden,
    GenerationFailed,
    InsufficientStorage,
    InvalidParameter,
    ModelNotFound,
    ModelRejected,
    SDError,
    SourceUnavailable,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = "5"

_STATUS = {
    InvalidParameter: 422,
    ModelRejected: 422,
    ModelNotFound: 404,
    Forbidden: 403,
    InsufficientStorage: 507,
    SourceUnavailable: 502,
    Cancelled: 503,
    GenerationFailed: 500,
}


class MalformedBody(Exception):
    """The body is not a JSON object (HTTP 400)."""


class QueueFull(Exception):
    """Admission refused: ``QUEUE_SIZE`` jobs are already waiting (HTTP 503 + Retry-After)."""


class NotAccepting(Exception):
    """Admission refused: the worker is starting, stopping or dead (HTTP 503 + Retry-After)."""

    def __init__(self, state: str):
        super().__init__(f"worker is {state}")
        self.state = state


class JobConflict(Exception):
    """A job with this id is already queued or running in this process (HTTP 409)."""

    def __init__(self, job_id: str):
        super().__init__(f"job '{job_id}' is already queued or running on this instance")
        self.job_id = job_id


class JobTimeout(Exception):
    """A real-time request waited longer than REQUEST_TIMEOUT (HTTP 504); the job goes on."""


def clean_message(exc: BaseException) -> str:
    """First line of ``Type: message`` with memory addresses removed, at most 500 characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)[:500]


def error_response(exc: BaseException, job_id: str | None = None) -> JSONResponse:
    """Map any exception to its status and body."""
    headers = {}
    field = None
    if isinstance(exc, MalformedBody):
        status, kind, detail = 400, "malformed", str(exc)
    elif isinstance(exc, QueueFull):
        status, kind, detail = 503, "queue_full", "the job queue is full; retry later"
        headers["Retry-After"] = RETRY_AFTER_S
    elif isinstance(exc, NotAccepting):
        status, kind, detail = 503, "unavailable", f"not accepting jobs: {exc}"
        headers["Retry-After"] = RETRY_AFTER_S
    elif isinstance(exc, JobConflict):
        status, kind, detail, field = 409, "conflict", str(exc), "id"
    elif isinstance(exc, JobTimeout):
        status, kind, detail = 504, "timeout", str(exc)
    elif isinstance(exc, SDError):
        status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 500)
        kind, detail, field = exc.kind, exc.message, exc.field
        if status >= 500 and not isinstance(exc, Cancelled):
            log.error("job %s failed: %s", job_id, detail)
    else:
        log.error("unexpected error (job %s)", job_id, exc_info=exc)
        status, kind, detail = 500, "internal", clean_message(exc)
    body = {"error": kind, "detail": detail, "field": field, "job_id": job_id}
    return JSONResponse(body, status_code=status, headers=headers)


async def handle_any(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI exception handler: everything a route did not answer itself."""
    return error_response(exc)
