"""Pytest plugin: a real S3 server (SeaweedFS) for every test that touches S3.

Loaded by ``tests/conftest.py`` through ``pytest_plugins``. Fixtures:

* ``s3_server`` (session) — a started :class:`~tests.support.seaweed.SeaweedServer`;
  the server starts only when a test asks for it, so pure-Python test runs pay nothing.
* ``s3_env`` (session) — ``{AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION,
  S3_ENDPOINT_URL}`` to point a server subprocess (or ``monkeypatch.setenv``) at it.
* ``s3_client`` (session) — a boto3 client for it (path-style, dummy credentials).
* ``s3_bucket`` (function) — a fresh, created, empty bucket name per test.
"""

from __future__ import annotations

import uuid

import pytest

from tests.support.seaweed import SeaweedServer


@pytest.fixture(scope="session")
def s3_server():
    """One SeaweedFS per test session; killed (with its temp dir) at session end or interpreter exit."""
    server = SeaweedServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_env(s3_server) -> dict[str, str]:
    """Environment variables (the app's contract) that point a process at ``s3_server``."""
    return dict(s3_server.env)


@pytest.fixture(scope="session")
def s3_client(s3_server):
    """A boto3 S3 client for ``s3_server``."""
    return s3_server.client()


@pytest.fixture
def s3_bucket(s3_server, s3_client) -> str:
    """A fresh bucket per test, so tests never see each other's objects."""
    name = "test-" + uuid.uuid4().hex[:16]
    s3_client.create_bucket(Bucket=name)
    return name
