"""`sdctl models`: list and upload models in the model store (A1111 folder layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from client.cli_common import err_console, handled
from client.config import Config

models_app = typer.Typer(help="List and upload models in the model store.", no_args_is_help=True)


@models_app.command("list")
@handled
def models_list(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Option("--type", help="Stable-diffusion, Lora, VAE, …")] = None,
):
    """Models in the store, per kind."""
    from client.models import list_models
    from model_cache.names import MODEL_KINDS

    config: Config = ctx.obj
    refs = list_models(config.require_models(), [kind] if kind else list(MODEL_KINDS), s3_factory=config.s3)
    for ref in refs:
        typer.echo(f"{ref.kind}/{ref.name}\t{ref.size}")


@models_app.command("upload")
@handled
def models_upload(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="Local model file.")],
    kind: Annotated[str, typer.Option("--type", help="Stable-diffusion|Lora|hypernetworks|embeddings|VAE|ControlNet|annotators")],
    name: Annotated[str | None, typer.Option("--name", help="Name in the store (default: the file name).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a file with different content.")] = False,
):
    """Upload a model (multipart, resumable: re-run after an interruption; progress bar; sha256 stored as metadata)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    from client.models import upload

    config: Config = ctx.obj
    store = config.require_models()
    size = path.stat().st_size if path.is_file() else 0
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err_console()) as bar:
        hashing = bar.add_task("sha256", total=size)
        sending = bar.add_task("upload", total=size, visible=False)

        def on_upload(n: int) -> None:
            bar.update(sending, advance=n, visible=True)

        def on_note(text: str) -> None:
            bar.console.print(text)
            if text.startswith("resuming"):
                bar.update(sending, description="upload (resumed)")

        result = upload(store, path, kind, name=name, force=force, s3_factory=config.s3,
                        hash_progress=lambda n: bar.update(hashing, advance=n), upload_progress=on_upload, note=on_note)
    if result.uploaded:
        typer.echo(f"uploaded {result.location} sha256 {result.sha256}")
    else:
        typer.echo(f"already there: {result.location} sha256 {result.sha256}")


