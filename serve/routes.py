"""HTTP routes only: the SageMaker contract and the A1111-compatible subset.

Async answers: with ``"output": {"inline": false}`` the body keeps A1111's shape
with ``"images": []`` and the job record under ``"job"`` (small; SageMaker stores
it as the async output). A job stopped by its ``cancel``
marker answers 503 ``{"error": "cancelled"}`` (as a shutdown cancel does), so
SageMaker files it under its failure path; a job id already queued or running on
this instance answers 409 ``{"error": "conflict"}``.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from pipelines.samplers import list_samplers, list_schedulers
from serve.errors import JobTimeout, error_response
from serve.image_uris import image_slots, inline_image_uris
from serve.records import CANCEL_MARKER, open_writer_at
from serve.requests import build_job, parse_body
from serve.schemas import ErrorBody, Txt2ImgResponse
from serve.worker import WorkerState

router = APIRouter()

CACHE_ANSWER_TIMEOUT = 5.0  # seconds; the worker answers from bookkeeping, in milliseconds

_ERRORS = {code: {"model": ErrorBody} for code in (400, 403, 404, 409, 422, 500, 502, 503, 504)}


@router.get("/ping", responses={503: {"model": ErrorBody}})
async def ping(request: Request) -> JSONResponse:
    """200 while the worker is ready or busy; 503 while starting, stopping, or after it died."""
    worker = request.app.state.worker
    state = worker.state
    body = {"status": state.value, "running_job": worker.running_job, "progress": worker.progress, "in_flight": worker.pending}
    if state in (WorkerState.READY, WorkerState.BUSY):
        return JSONResponse(body)
    body["reason"] = worker.reason
    return JSONResponse(body, status_code=503)


@router.post("/invocations", response_model=Txt2ImgResponse, responses=_ERRORS)
async def invocations(request: Request) -> JSONResponse:
    """A bare A1111 txt2img or img2img body (``init_images`` makes it img2img) or the envelope ``{task, id, payload, output}``."""
    return await _run(request, task=None)


@router.post("/sdapi/v1/txt2img", response_model=Txt2ImgResponse, responses=_ERRORS)
async def sdapi_txt2img(request: Request) -> JSONResponse:
    """A1111's own route, for clients written against the WebUI API."""
    return await _run(request, task="txt2img")


@router.post("/sdapi/v1/img2img", response_model=Txt2ImgResponse, responses=_ERRORS)
async def sdapi_img2img(request: Request) -> JSONResponse:
    """A1111's img2img route (init image, denoising strength, resize mode, mask)."""
    return await _run(request, task="img2img")


@router.post("/jobs/{job_id}/cancel", status_code=202, responses={422: {"model": ErrorBody}})
async def cancel_job(job_id: str, request: Request) -> JSONResponse:
    """Write the job's ``cancel`` marker (where the job writes, if it is queued or running here; else ``OUTPUT``).

    The running job stops at its next step (within about a second); a queued one
    is cancelled when it would start. Answers 202 with the marker's location.
    """
    settings = request.app.state.settings
    uri = request.app.state.worker.output_of(job_id) or settings.output
    try:
        writer = open_writer_at(settings, uri)
        marker = await asyncio.to_thread(writer.put_bytes, job_id, CANCEL_MARKER, b"", "application/octet-stream")
    except Exception as exc:  # noqa: BLE001 - mapped in one place
        return error_response(exc, job_id)
    return JSONResponse({"job_id": job_id, "cancel": marker}, status_code=202)


@router.get("/cache", responses={503: {"model": ErrorBody}, 504: {"model": ErrorBody}})
async def cache(request: Request) -> JSONResponse:
    """What the worker holds: checkpoints per memory tier (``vram``, ``ram``; LRU first) with budgets,
    bytes, hits, misses and evictions, and the disk tier when the model store has one. Answered mid-job too."""
    worker = request.app.state.worker
    try:
        future = worker.ask_cache()
        try:
            answer = await asyncio.wait_for(asyncio.wrap_future(future), timeout=CACHE_ANSWER_TIMEOUT)
        except TimeoutError:
            future.cancel()  # forgets the question
            raise JobTimeout(f"the worker did not answer within {CACHE_ANSWER_TIMEOUT:.0f} s") from None
    except Exception as exc:  # noqa: BLE001 - mapped in one place
        return error_response(exc, None)
    return JSONResponse(answer)


@router.get("/sdapi/v1/samplers")
async def sdapi_samplers() -> list[dict]:
    return list_samplers()


@router.get("/sdapi/v1/schedulers")
async def sdapi_schedulers() -> list[dict]:
    return list_schedulers()


async def _run(request: Request, task: str | None) -> JSONResponse:
    settings = request.app.state.settings
    worker = request.app.state.worker
    job_id = None
    try:
        body = parse_body(await request.body())
        sources = {}
        if isinstance(body.get("payload"), dict) and image_slots(body["payload"]):  # images given by location
            sources = await asyncio.to_thread(inline_image_uris, body, settings, lambda: _s3_client(request.app))
        job = build_job(body, settings, task=task)
        job.image_sources = sources
        job_id = job.job_id
        future = worker.submit(job)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout=settings.request_timeout)
        except TimeoutError:
            raise JobTimeout(f"job {job_id} did not finish within {settings.request_timeout:.0f} s; it goes on, see its job.json") from None
    except Exception as exc:  # noqa: BLE001 - mapped in one place
        return error_response(exc, job_id)
    if not job.output.inline:
        # SageMaker async stores the response as the job's output: keep it small, the record
        return JSONResponse(result["job"])
    return JSONResponse(
        {
            "images": result["images"],
            "parameters": job.parameters,
            "info": result["info"],
            "job_id": job_id,
            "warnings": job.warnings + result.get("warnings", []),
            "job": result["job"],
        }
    )


def _s3_client(app):
    """One S3 client for the HTTP process (made on first use: local-only setups never need AWS settings)."""
    client = getattr(app.state, "s3_client", None)
    if client is None:
        from model_cache.s3 import make_s3_client

        settings = app.state.settings
        client = app.state.s3_client = make_s3_client(settings.s3_endpoint_url, settings.aws_region)
    return client
