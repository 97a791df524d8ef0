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
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from client.cli_common import err_console as _err_console
from client.cli_common import handled
from client.config import (
    EXIT_JOB_FAILED,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    Clients,
    CliError,
    Config,
)
from client.jobs import (
    FINAL,
    RANK,
    STATUSES,
    JobStore,
    is_stale,
    latest,
    parse_time,
    png_text,
)
from client.storage import open_location

app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False, rich_markup_mode=None)


@app.callback()
def _global(
    ctx: typer.Context,
    output: Annotated[str | None, typer.Option("--output", envvar="SD_OUTPUT", help="Job outputs: s3://bucket/prefix/ or a folder.")] = None,
    models: Annotated[str | None, typer.Option("--models", envvar="SD_MODEL_STORE", help="Model store: s3://bucket/prefix/ or a folder.")] = None,
    s3_endpoint_url: Annotated[str | None, typer.Option("--s3-endpoint-url", envvar="S3_ENDPOINT_URL", help="S3-compatible endpoint (MinIO, SeaweedFS).")] = None,
    region: Annotated[str | None, typer.Option("--region", envvar=["AWS_REGION", "AWS_DEFAULT_REGION"], help="AWS region.")] = None,
):
    """sdctl: Stable Diffusion jobs on SageMaker or a local server."""
    clients = ctx.obj if isinstance(ctx.obj, Clients) else Clients()  # tests inject their clients here
    ctx.obj = Config(output=output, models=models, s3_endpoint_url=s3_endpoint_url, region=region, clients=clients)


_STALE_HELP = "Seconds without a heartbeat before an inprogress job counts as dead and is written failed (default 600, env SDCTL_STALE_AFTER; 0 = never)."


def _store(ctx: typer.Context) -> JobStore:
    config: Config = ctx.obj
    return JobStore(open_location(config.require_output(), config.s3))


def _time_opt(value: str | None, flag: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise CliError(f"{flag} {value!r}: expected an ISO time such as 2026-01-31 or 2026-01-31T12:00:00Z", EXIT_USAGE) from None


def _matches_checkpoint(record_value: str | None, wanted: str) -> bool:
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
    n: Annotated[int, typer.Option("-n", help="How many (newest first).")] = 10,
    all_: Annotated[bool, typer.Option("--all", help="Every job.")] = False,
    status: Annotated[str | None, typer.Option("--status", help="|".join(STATUSES))] = None,
    task: Annotated[str | None, typer.Option("--task", help="txt2img or img2img.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Created at or after (ISO).")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Created at or before (ISO).")] = None,
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", help="Checkpoint name (reads records).")] = None,
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="Endpoint name (reads records).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document instead of lines.")] = False,
    mark_stale: Annotated[bool, typer.Option("--mark-stale", help="Write listed inprogress jobs silent for --stale-after as failed.")] = False,
    stale_after: Annotated[float | None, typer.Option("--stale-after", help=_STALE_HELP)] = None,
):
    """Jobs as Time-Type-Status-UUID lines, newest first (latest 10 unless --all)."""
    from client.stale import fail_after, mark_if_stale

    threshold = fail_after(stale_after) if mark_stale else 0.0
    if status is not None and status not in STATUSES:
        raise CliError(f"--status {status!r}: expected one of {', '.join(STATUSES)}", EXIT_USAGE)
    if n < 1 and not all_:
        raise CliError("-n must be at least 1", EXIT_USAGE)
    store = _store(ctx)
    since_dt, until_dt = _time_opt(since, "--since"), _time_opt(until, "--until")
    records: dict[str, dict | None] = {}

    def record(entry) -> dict | None:
        if entry.job_id not in records:
            records[entry.job_id] = store.record(entry.job_id)
        return records[entry.job_id]

    def keep(entry) -> bool:
        rec = record(entry) or {}
        if checkpoint and not _matches_checkpoint(rec.get("checkpoint"), checkpoint):
            return False
        return not (endpoint and rec.get("endpoint") != endpoint)

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
        if shown == "inprogress" and threshold > 0:
            marked = mark_if_stale(store, rec, threshold)
            if marked is not None:
                rec, shown = marked, "failed"
                records[entry.job_id] = marked
        stale = shown == "inprogress" and is_stale(rec)
        created = datetime.fromtimestamp(entry.created_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        rows.append({"name": f"{entry.ts}-{entry.task}-{shown}-{entry.job_id}", "id": entry.job_id, "task": entry.task,
                     "status": shown, "stale": stale, "created": created, "record": rec})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(row["name"] + (" (stale?)" if row["stale"] else ""))


@app.command()
@handled
def show(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="Job id.")],
    stale_after: Annotated[float | None, typer.Option("--stale-after", help=_STALE_HELP)] = None,
):
    """The job record, its params.json and the infotext of its first image (a dead inprogress job is marked failed)."""
    from client.stale import fail_after, mark_if_stale

    store = _store(ctx)
    record = store.require_record(job)
    marked = mark_if_stale(store, record, fail_after(stale_after))
    if marked is not None:
        typer.echo(f"note: marked failed: {marked['error']}", err=True)
        record = marked
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
    job: Annotated[str, typer.Argument(help="Job id.")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Folder (default ./<job id>).")] = None,
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
    job: Annotated[str, typer.Argument(help="Job id.")],
    interval: Annotated[float, typer.Option("--interval", help="Seconds between polls.")] = 2.0,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Give up after this many seconds (exit 1).")] = None,
    stale_after: Annotated[float | None, typer.Option("--stale-after", help=_STALE_HELP)] = None,
):
    """Follow a job with a progress bar; exit 0 when it succeeds, 1 when it fails, is cancelled or its worker is gone."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from client.stale import fail_after, mark_if_stale

    threshold = fail_after(stale_after)
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
            marked = mark_if_stale(store, record, threshold)
            if marked is not None:  # the worker is gone: the job will never finish
                record = marked
                continue
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
    job: Annotated[str, typer.Argument(help="Job id.")],
    local: Annotated[str | None, typer.Option("--local", help="Server URL: POST URL/jobs/{id}/cancel instead.")] = None,
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
# txt2img, img2img and submit live in client/cli_generate.py (registered below)


# ---------------------------------------------------------------- endpoints
@app.command()
@handled
def endpoints(
    ctx: typer.Context,
    local: Annotated[str | None, typer.Option("--local", help="A docker run / make serve URL: show its /ping.")] = None,
    name_contains: Annotated[str | None, typer.Option("--name-contains")] = None,
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


# the generation and `models` commands live in their own modules
from client import cli_generate, cli_models

cli_generate.register(app)
app.add_typer(cli_models.models_app, name="models")


if __name__ == "__main__":
    main()
