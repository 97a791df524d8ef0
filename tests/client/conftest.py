"""Helpers for sdctl tests: run the CLI in-process with injected clients, count S3 calls."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from client.cli import app
from client.config import Clients
from client.jobs import index_key, iso

BASE = datetime(2026, 1, 1, tzinfo=UTC)


class CountingClient:
    """Wraps a boto3 client and counts calls by operation name."""

    def __init__(self, inner):
        self._inner = inner
        self.calls: Counter = Counter()

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr) or name.startswith("_") or name in ("get_paginator", "meta", "exceptions"):
            return attr

        def call(*args, **kwargs):
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return call


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    """sdctl's upload state files go to the test's folder, never the user's cache."""
    monkeypatch.setenv("SDCTL_STATE_DIR", str(tmp_path / "sdctl-state"))
    monkeypatch.delenv("SDCTL_STALE_AFTER", raising=False)


@pytest.fixture
def sdctl():
    """``sdctl(*args, clients=None, env=None) -> Result`` (CliRunner, stderr kept apart)."""

    def run(*args, clients: Clients | None = None, env: dict | None = None):
        runner = CliRunner()
        base_env = {"SD_OUTPUT": None, "SD_MODEL_STORE": None, "S3_ENDPOINT_URL": None}
        return runner.invoke(app, [str(a) for a in args], obj=clients or Clients(), env={**base_env, **(env or {})})

    return run


def put(client, bucket: str, key: str, body: bytes = b"") -> None:
    client.put_object(Bucket=bucket, Key=key, Body=body)


def write_job(client, bucket: str, prefix: str, job_id: str, created: datetime, task: str, status: str, **record) -> dict:
    """A job as the container leaves it: job.json plus its index key."""
    rec = {
        "id": job_id, "task": task, "status": status, "created": iso(created), "started": iso(created),
        "finished": None, "heartbeat": iso(created), "progress": 1.0 if status == "succeed" else 0.5,
        "error": None, "phase": None, "checkpoint": None, "endpoint": None, "images": [], "timings": {}, "warnings": [],
        **record,
    }
    put(client, bucket, f"{prefix}{job_id}/job.json", json.dumps(rec).encode())
    put(client, bucket, prefix + index_key(created, task, status, job_id))
    return rec


def created_at(i: int) -> datetime:
    return BASE + timedelta(minutes=i, milliseconds=i)
