"""sdctl: submit Stable Diffusion jobs, follow them, fetch their images, manage models.

Global options (or environment): ``--output`` (``SD_OUTPUT``: ``s3://bucket/prefix/`` or a
folder, where job folders and the ``_index/`` live), ``--models`` (``SD_MODEL_STORE``),
``--s3-endpoint-url`` (``S3_ENDPOINT_URL``), ``--region`` (``AWS_REGION``).

Exit codes (stable; scripts may test them):

====  =====================================================================
0     success (``wait``: the job succeeded; ``models upload``: uploaded or already there)
1     the job failed or was cancelled (``wait``), or a server answered with an error
2     usage or validation error (bad flag, bad name, refused overwrite without ``--force``)
3     SageMaker endpoint not found or not ``InService`` (nothing was submitted)
4     job or model not found
5     no credentials, bucket missing, S3/SageMaker/network error
====  =====================================================================
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import typer

from client.cli_common import err_console as _err_console
from client.cli_common import handled
from client.config import EXIT_JOB_FAILED, EXIT_NOT_FOUND, EXIT_USAGE, CliError, Clients, Config
from client.jobs import FINAL, RANK, STATUSES, JobStore, is_stale, latest, parse_time, png_text
from client.storage import open_location

app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False, rich_markup_mode=None)


@app.callback()
def _global(
    ctx: typer.Context,
    output: Optional[str] = typer.Option(None, "--output", envvar="SD_OUTPUT", help="Job outputs: s3://bucket/prefix/ or a folder."),
    models: Optional[str] = typer.Option(None, "--models", envvar="SD_MODEL_STORE", help="Model store: s3://bucket/prefix/ or a folder."),
    s3_endpoint_url: Optional[str] = typer.Option(None, "--s3-endpoint-url", envvar="S3_ENDPOINT_URL", help="S3-compatible endpoint (MinIO, SeaweedFS)."),
    region: Optional[str] = typer.Option(None, "--region", envvar=["AWS_REGION", "AWS_DEFAULT_REGION"], help="AWS region."),
):
    """sdctl: Stable Diffusion jobs on SageMaker or a local server."""
    clients = ctx.obj if isinstance(ctx.obj, Clients) else Clients()  # tests inject their clients here
    ctx.obj = Config(output=output, models=models, s3_endpoint_url=s3_endpoint_url, region=region, clients=clients)


def _store(ctx: typer.Context) -> JobStore:
    config: Config = ctx.obj
    return JobStore(open_location(config.require_output(), config.s3))


def _time_opt(value: Optional[str], flag: str) -> Optional[datetime]:
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise CliError(f"{flag} {value!r}: expected an ISO time such as 2026-01-31 or 2026-01-31T12:00:00Z", EXIT_USAGE) from None


def _matches_checkpoint(record_value: Optional[str], wanted: str) -> bool:
    if not record_value:
        return False
    from model_cache.names import split_hash, stem

    have, want = split_hash(record_value)[0], split_hash(wanted)[0]
    return have == want or stem(have) == stem(want)


# ---------------------------------------------------------------- jobs
@app.command()
@handled
def jobs(
    ctx: typer.Context,
    n: int = typer.Option(10, "-n", help="How many (newest first)."),
    all_: bool = typer.Option(False, "--all", help="Every job."),
    status: Optional[str] = typer.Option(None, "--status", help="|".join(STATUSES)),
    task: Optional[str] = typer.Option(None, "--task", help="txt2img or img2img."),
    since: Optional[str] = typer.Option(None, "--since", help="Created at or after (ISO)."),
    until: Optional[str] = typer.Option(None, "--until", help="Created at or before (ISO)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint name (reads records)."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Endpoint name (reads records)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of lines."),
):
    """Jobs as Time-Type-Status-UUID lines, newest first (latest 10 unless --all)."""
    if status is not None and status not in STATUSES:
        raise CliError(f"--status {status!r}: expected one of {', '.join(STATUSES)}", EXIT_USAGE)
    if n < 1 and not all_:
        raise CliError("-n must be at least 1", EXIT_USAGE)
    store = _store(ctx)
    since_dt, until_dt = _time_opt(since, "--since"), _time_opt(until, "--until")
    records: dict[str, Optional[dict]] = {}

    def record(entry) -> Optional[dict]:
        if entry.job_id not in records:
            records[entry.job_id] = store.record(entry.job_id)
        return records[entry.job_id]

    def keep(entry) -> bool:
        rec = record(entry) or {}
        if checkpoint and not _matches_checkpoint(rec.get("checkpoint"), checkpoint):
            return False
        if endpoint and rec.get("endpoint") != endpoint:
            return False
        return True

    found = latest(
        store.index_entries(until_dt),
        None if all_ else n,
        status=status,
        task=task,
        since=since_dt,
        until=until_dt,
        keep=keep if (checkpoint or endpoint) else None,
    )
    rows = []
    for entry in found:
        # Only inprogress jobs need their record (staleness); --json shows every record.
        rec = record(entry) if (as_json or entry.status == "inprogress") else records.get(entry.job_id)
        shown = entry.status
        if rec and rec.get("status") in RANK and RANK[rec["status"]] > RANK[entry.status]:
            shown = rec["status"]  # the record moved on before its index key did
        stale = shown == "inprogress" and is_stale(rec)
        created = datetime.fromtimestamp(entry.created_ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        rows.append({"name": f"{entry.ts}-{entry.task}-{shown}-{entry.job_id}", "id": entry.job_id, "task": entry.task,
                     "status": shown, "stale": stale, "created": created, "record": rec})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(row["name"] + (" (stale?)" if row["stale"] else ""))


@app.command()
@handled
def show(ctx: typer.Context, job: str = typer.Argument(..., help="Job id.")):
    """The job record, its params.json and the infotext of its first image."""
    store = _store(ctx)
    record = store.require_record(job)
    typer.echo(json.dumps(record, indent=2))
    if is_stale(record):
        typer.echo("note: no heartbeat for over 120 s; the job is probably dead (stale)", err=True)
    params = store.get_json(job, "params.json")
    if params is not None:
        typer.echo("\nparams.json:")
        typer.echo(json.dumps(params, indent=2))
    png = store.loc.get(f"{job}/image-0.png")
    if png is not None:
        typer.echo("\ninfotext (image-0.png):")
        typer.echo(png_text(png) or "(none)")


@app.command()
@handled
def get(
    ctx: typer.Context,
    job: str = typer.Argument(..., help="Job id."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Folder (default ./<job id>)."),
):
    """Download the job's images, params.json and job.json."""
    store = _store(ctx)
    store.require_record(job)
    dest = out or Path(job)
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for key in store.files(job):
        name = key.rsplit("/", 1)[-1]
        if name in ("params.json", "job.json") or (name.startswith("image-") and name.endswith(".png")):
            data = store.loc.get(key)
            if data is not None:
                (dest / name).write_bytes(data)
                count += 1
    typer.echo(f"{count} files → {dest}")


@app.command()
@handled
def wait(
    ctx: typer.Context,
    job: str = typer.Argument(..., help="Job id."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between polls."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Give up after this many seconds (exit 1)."),
):
    """Follow a job with a progress bar; exit 0 when it succeeds, 1 when it fails or is cancelled."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    store = _store(ctx)
    record = store.require_record(job)
    deadline = None if timeout is None else time.monotonic() + timeout
    warned = False
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=_err_console(), transient=False) as bar:
        task_id = bar.add_task(f"{job[:8]} {record.get('status')}", total=1.0)
        while True:
            status = record.get("status")
            bar.update(task_id, completed=float(record.get("progress") or 0.0), description=f"{job[:8]} {status}")
            if status in FINAL:
                if status == "succeed":
                    bar.update(task_id, completed=1.0)
                break
            if is_stale(record) and not warned:
                bar.console.print("no heartbeat for over 120 s: the job may be dead (stale)")
                warned = True
            if deadline is not None and time.monotonic() >= deadline:
                raise CliError(f"job {job} still {status} after {timeout:g} s", EXIT_JOB_FAILED)
            time.sleep(interval)
            record = store.require_record(job)
    if record["status"] == "succeed":
        typer.echo(f"{job} succeed")
        return
    reason = f": {record.get('error')}" if record.get("error") else ""
    typer.echo(f"{job} {record['status']}{reason}", err=True)
    raise typer.Exit(EXIT_JOB_FAILED)


@app.command()
@handled
def cancel(
    ctx: typer.Context,
    job: str = typer.Argument(..., help="Job id."),
    local: Optional[str] = typer.Option(None, "--local", help="Server URL: POST URL/jobs/{id}/cancel instead."),
):
    """Ask a job to stop: writes its cancel marker (or asks a local server)."""
    if local:
        import httpx

        try:
            response = httpx.post(f"{local.rstrip('/')}/jobs/{job}/cancel", timeout=30)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach {local}: {exc}", 5) from None
        if response.status_code == 404:
            raise CliError(f"job {job} not found on {local}", EXIT_NOT_FOUND)
        if response.status_code >= 400:
            raise CliError(f"{local} answered {response.status_code}: {response.text}", EXIT_JOB_FAILED)
        typer.echo(f"cancel requested for {job}")
        return
    where = _store(ctx).cancel(job)
    typer.echo(f"cancel requested for {job} ({where})")


# ---------------------------------------------------------------- submit
def _run(ctx: typer.Context, task: str, payload: dict, job_id: Optional[str], local: Optional[str],
         endpoint: Optional[str], out: Optional[Path]) -> None:
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


@app.command()
@handled
def txt2img(
    ctx: typer.Context,
    prompt: str = typer.Option(..., "--prompt", "-p"),
    negative: Optional[str] = typer.Option(None, "--negative"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="A1111 sampler name, e.g. 'DPM++ 2M'."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Schedule type, e.g. Karras."),
    steps: Optional[int] = typer.Option(None, "--steps"),
    cfg: Optional[float] = typer.Option(None, "--cfg"),
    width: Optional[int] = typer.Option(None, "--width"),
    height: Optional[int] = typer.Option(None, "--height"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    batch: Optional[int] = typer.Option(None, "--batch"),
    n_iter: Optional[int] = typer.Option(None, "--n-iter"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint"),
    vae: Optional[str] = typer.Option(None, "--vae"),
    clip_skip: Optional[int] = typer.Option(None, "--clip-skip"),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="name:weight, repeatable."),
    local: Optional[str] = typer.Option(None, "--local", help="Server URL for a synchronous run."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="SageMaker async endpoint name."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="--local: folder for the images (default ./<job id>)."),
    job_id: Optional[str] = typer.Option(None, "--id", help="Job id (default: a new UUID)."),
):
    """Text to image with A1111 flags; prints the job id."""
    from client.submit import txt2img_payload

    payload = txt2img_payload(
        prompt=prompt, negative=negative, sampler=sampler, scheduler=scheduler, steps=steps, cfg=cfg, width=width,
        height=height, seed=seed, batch=batch, n_iter=n_iter, checkpoint=checkpoint, vae=vae, clip_skip=clip_skip,
        loras=lora or [],
    )
    _run(ctx, "txt2img", payload, job_id, local, endpoint, out)


@app.command()
@handled
def submit(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="An A1111 payload or an envelope {task, id, payload}."),
    local: Optional[str] = typer.Option(None, "--local", help="Server URL for a synchronous run."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="SageMaker async endpoint name."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="--local: folder for the images."),
):
    """Submit a JSON request file; prints the job id."""
    from client.submit import read_request_file

    task, payload, job_id = read_request_file(file)
    _run(ctx, task, payload, job_id, local, endpoint, out)


# ---------------------------------------------------------------- endpoints
@app.command()
@handled
def endpoints(
    ctx: typer.Context,
    local: Optional[str] = typer.Option(None, "--local", help="A docker run / make serve URL: show its /ping."),
    name_contains: Optional[str] = typer.Option(None, "--name-contains"),
):
    """SageMaker endpoints: name, status, instance type, async or real-time."""
    from rich.console import Console
    from rich.table import Table

    if local:
        import httpx

        try:
            response = httpx.get(local.rstrip("/") + "/ping", timeout=5)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach {local}: {exc}", 5) from None
        typer.echo(f"{local}\t{'InService' if response.status_code == 200 else 'NotReady'}\tlocal\treal-time")
        return
    from client.endpoints import list_endpoints

    found = list_endpoints(ctx.obj.sagemaker(), name_contains)
    table = Table("name", "status", "instance", "mode")
    for item in found:
        table.add_row(item.name, item.status, item.instance_type or "-", item.mode)
    Console(width=200).print(table)


def main() -> None:
    """Console-script entry point."""
    app()


# the `models` sub-commands live in their own module; importing it registers them
from client import cli_models  # noqa: E402

app.add_typer(cli_models.models_app, name="models")


if __name__ == "__main__":
    main()
