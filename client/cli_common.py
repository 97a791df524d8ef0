"""Pieces every sdctl command shares: error → exit code, the stderr console."""

from __future__ import annotations

import functools

import typer

from client.config import CliError


def handled(func):
    """Turn a :class:`CliError` into its message on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CliError as exc:
            typer.echo(f"error: {exc.message}", err=True)
            raise typer.Exit(exc.code) from None

    return wrapper


def err_console():
    from rich.console import Console

    return Console(stderr=True)
