"""sdctl settings and the AWS clients it uses, built once per command and injected.

Settings come from global options, then environment variables (``SD_OUTPUT``,
``SD_MODEL_STORE``, ``S3_ENDPOINT_URL``, ``AWS_REGION``). Clients are made lazily
through factories so a command that never touches AWS never needs credentials, and
tests pass their own (SeaweedFS S3, botocore Stubber / moto for SageMaker).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Exit codes scripts can test (also listed in ``client/cli.py``'s docstring).
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_ENDPOINT = 3
EXIT_NOT_FOUND = 4
EXIT_AWS = 5


class CliError(Exception):
    """An error a person can act on: a message and the exit code it maps to."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class Clients:
    """Factories for the AWS clients; each is made at most once."""

    s3_factory: Callable[[], Any] | None = None
    sagemaker_factory: Callable[[], Any] | None = None
    runtime_factory: Callable[[], Any] | None = None
    _made: dict = field(default_factory=dict)

    def _get(self, name: str, factory: Callable[[], Any] | None, default: Callable[[], Any]) -> Any:
        if name not in self._made:
            self._made[name] = (factory or default)()
        return self._made[name]


@dataclass
class Config:
    """Resolved global options for one sdctl invocation."""

    output: str | None = None
    models: str | None = None
    s3_endpoint_url: str | None = None
    region: str | None = None
    clients: Clients = field(default_factory=Clients)

    def s3(self):
        """The S3 client (``S3_ENDPOINT_URL`` honoured: SeaweedFS, MinIO)."""
        from model_cache.s3 import make_s3_client

        return self.clients._get("s3", self.clients.s3_factory, lambda: make_s3_client(self.s3_endpoint_url, self.region))

    def sagemaker(self):
        """The SageMaker control-plane client (describe/list endpoints)."""
        import boto3

        return self.clients._get(
            "sagemaker", self.clients.sagemaker_factory, lambda: boto3.session.Session().client("sagemaker", region_name=self.region)
        )

    def runtime(self):
        """The SageMaker runtime client (InvokeEndpointAsync)."""
        import boto3

        return self.clients._get(
            "runtime",
            self.clients.runtime_factory,
            lambda: boto3.session.Session().client("sagemaker-runtime", region_name=self.region),
        )

    def require_output(self) -> str:
        """The OUTPUT location, or a usage error saying how to set it."""
        if not self.output:
            raise CliError("no output location: pass --output s3://bucket/prefix/ (or a folder) or set SD_OUTPUT", EXIT_USAGE)
        return self.output

    def require_models(self) -> str:
        """The model store location, or a usage error saying how to set it."""
        if not self.models:
            raise CliError("no model store: pass --models s3://bucket/prefix/ (or a folder) or set SD_MODEL_STORE", EXIT_USAGE)
        return self.models
