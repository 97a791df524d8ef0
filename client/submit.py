"""Build A1111 payloads from flags, and submit them: sync to a local/real-time server, or async to SageMaker.

Async order matters: the endpoint is checked ``InService`` first, so a job is never
recorded or uploaded for an endpoint that cannot run it; then the ``created`` record
and index key, then ``input.json``, then ``InvokeEndpointAsync`` (``InferenceId`` = job id).
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
from botocore.exceptions import BotoCoreError, ClientError

from client.config import EXIT_AWS, EXIT_USAGE, CliError, Config
from client.endpoints import require_in_service
from client.jobs import JobStore
from client.storage import open_location

_LORA = re.compile(r"^(?P<name>[^:<>]+):(?P<weight>-?\d+(\.\d+)?)$")
_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def lora_tags(specs: list[str]) -> str:
    """``["style:0.8"]`` → ``"<lora:style:0.8>"``; bad specs are a usage error naming the flag."""
    tags = []
    for spec in specs:
        match = _LORA.match(spec.strip())
        if not match:
            raise CliError(f"--lora {spec!r}: expected name:weight, e.g. --lora myStyle:0.8", EXIT_USAGE)
        tags.append(f"<lora:{match['name']}:{match['weight']}>")
    return " ".join(tags)


def txt2img_payload(
    *,
    prompt: str,
    negative: str | None = None,
    sampler: str | None = None,
    scheduler: str | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    width: int | None = None,
    height: int | None = None,
    seed: int | None = None,
    batch: int | None = None,
    n_iter: int | None = None,
    checkpoint: str | None = None,
    vae: str | None = None,
    clip_skip: int | None = None,
    loras: list[str] | None = None,
) -> dict[str, Any]:
    """An A1111 ``/sdapi/v1/txt2img`` body with only the flags the user gave (server defaults otherwise)."""
    if loras:
        prompt = f"{prompt} {lora_tags(loras)}".strip()
    payload: dict[str, Any] = {"prompt": prompt}
    for key, value in (
        ("negative_prompt", negative),
        ("sampler_name", sampler),
        ("scheduler", scheduler),
        ("steps", steps),
        ("cfg_scale", cfg),
        ("width", width),
        ("height", height),
        ("seed", seed),
        ("batch_size", batch),
        ("n_iter", n_iter),
    ):
        if value is not None:
            payload[key] = value
    overrides = {}
    if checkpoint:
        overrides["sd_model_checkpoint"] = checkpoint
    if vae:
        overrides["sd_vae"] = vae
    if clip_skip is not None:
        overrides["CLIP_stop_at_last_layers"] = clip_skip
    if overrides:
        payload["override_settings"] = overrides
    return payload


def read_request_file(path: Path) -> tuple[str, dict, str | None]:
    """``(task, payload, id)`` from an A1111 payload file or an envelope file."""
    try:
        body = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CliError(f"{path}: no such file", EXIT_USAGE) from None
    except json.JSONDecodeError as exc:
        raise CliError(f"{path} is not valid JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(body, dict):
        raise CliError(f"{path}: expected a JSON object (an A1111 payload or an envelope)", EXIT_USAGE)
    if "payload" in body:
        if not isinstance(body["payload"], dict):
            raise CliError(f"{path}: 'payload' must be an object", EXIT_USAGE)
        return body.get("task", "txt2img"), body["payload"], body.get("id")
    return "txt2img", body, None


def new_job_id(given: str | None = None) -> str:
    """A fresh UUID, or the caller's id if it is safe to use as a folder/key name."""
    if given is None:
        return str(uuid.uuid4())
    if not _ID.match(given) or given in (".", ".."):
        raise CliError(f"job id {given!r} must be 1-128 of letters, digits, '.', '_' or '-'", EXIT_USAGE)
    return given


def envelope(task: str, job_id: str, payload: dict, *, inline: bool) -> dict:
    """The request body: ``{"task", "id", "payload"[, "output"]}``."""
    body: dict[str, Any] = {"task": task, "id": job_id, "payload": payload}
    if not inline:
        body["output"] = {"inline": False}
    return body


def submit_local(url: str, task: str, job_id: str, payload: dict, out_dir: Path | None, timeout: float = 600.0) -> tuple[str, list[Path]]:
    """POST the envelope to ``URL/invocations`` and wait; save images to ``out_dir``. Returns (job id, files)."""
    body = envelope(task, job_id, payload, inline=True)
    try:
        response = httpx.post(url.rstrip("/") + "/invocations", json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {url}: {exc}", EXIT_AWS) from None
    if response.status_code != 200:
        try:
            err = response.json()
            detail = err.get("detail") or err.get("error") or response.text
            field = f" (field {err['field']})" if err.get("field") else ""
        except ValueError:
            detail, field = response.text, ""
        code = EXIT_USAGE if response.status_code in (400, 422) else 4 if response.status_code == 404 else 1
        raise CliError(f"{url} answered {response.status_code}: {detail}{field}", code)
    answer = response.json()
    saved: list[Path] = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for n, b64 in enumerate(answer.get("images") or []):
            path = out_dir / f"image-{n}.png"
            path.write_bytes(base64.b64decode(b64))
            saved.append(path)
        if answer.get("parameters") is not None:
            (out_dir / "parameters.json").write_text(json.dumps(answer["parameters"], indent=2))
    return answer.get("job_id") or job_id, saved


def submit_async(config: Config, endpoint: str, task: str, job_id: str, payload: dict) -> str:
    """Record, upload and invoke asynchronously; returns the job id at once."""
    output = config.require_output()
    if not output.startswith("s3://"):
        raise CliError(f"async endpoints read their input from S3: --output must be s3://bucket/prefix/, got {output!r}", EXIT_USAGE)
    require_in_service(config.sagemaker(), endpoint)  # before anything is written
    store = JobStore(open_location(output, config.s3))
    checkpoint = (payload.get("override_settings") or {}).get("sd_model_checkpoint")
    store.create(job_id, task, endpoint=endpoint, checkpoint=checkpoint)
    input_uri = store.loc.put(
        f"{job_id}/input.json", json.dumps(envelope(task, job_id, payload, inline=False)).encode(), "application/json"
    )
    try:
        config.runtime().invoke_endpoint_async(
            EndpointName=endpoint, InputLocation=input_uri, ContentType="application/json", InferenceId=job_id
        )
    except (ClientError, BotoCoreError) as exc:
        raise CliError(f"InvokeEndpointAsync on {endpoint!r} failed: {exc} (job {job_id} stays 'created')", EXIT_AWS) from None
    return job_id
