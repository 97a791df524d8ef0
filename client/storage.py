"""The OUTPUT location as a tiny key/value store: an S3 prefix or a local folder.

Keys are relative ("<job>/job.json", "_index/<entry>"). Every S3 error that is
not "no such key" becomes a :class:`CliError` with exit code 5 (credentials,
missing bucket, endpoint unreachable), so commands never print a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from client.config import EXIT_AWS, EXIT_USAGE, CliError
from model_cache.atomic import write_bytes_atomic
from model_cache.s3 import is_not_found, parse_s3_uri, put_bytes
from pipelines.errors import InvalidParameter

PAGE = 1000  # S3's maximum page: one LIST answers "latest 10" with room for duplicates


def aws_error(exc: Exception, where: str) -> CliError:
    """Turn a boto error into a message a person can act on (exit 5)."""
    if isinstance(exc, NoCredentialsError):
        return CliError(f"no AWS credentials found for {where}: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY", EXIT_AWS)
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return CliError(f"bucket does not exist: {where}", EXIT_AWS)
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return CliError(f"access denied to {where} ({code}): check your credentials and the bucket policy", EXIT_AWS)
        return CliError(f"S3 error on {where}: {code}: {exc.response.get('Error', {}).get('Message', exc)}", EXIT_AWS)
    return CliError(f"cannot reach S3 for {where}: {exc}", EXIT_AWS)


class S3Location:
    """``s3://bucket/prefix/``."""

    def __init__(self, uri: str, client):
        try:
            self.bucket, prefix = parse_s3_uri(uri, field="output")
        except InvalidParameter as exc:
            raise CliError(exc.message, EXIT_USAGE) from None
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.client = client
        self.is_s3 = True

    def uri(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{rel}"

    def get(self, rel: str) -> bytes | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + rel)["Body"]
            try:
                return body.read()
            finally:
                body.close()
        except ClientError as exc:
            if is_not_found(exc) and exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
                return None
            raise aws_error(exc, self.uri(rel)) from None
        except BotoCoreError as exc:
            raise aws_error(exc, self.uri(rel)) from None

    def put(self, rel: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        try:
            put_bytes(self.client, self.bucket, self.prefix + rel, data, content_type)
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, self.uri(rel)) from None
        return self.uri(rel)

    def delete(self, rel: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + rel)
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, self.uri(rel)) from None

    def pages(self, rel_prefix: str, start_after: str | None = None, first_page: int = PAGE) -> Iterator[list[str]]:
        """Pages of relative keys under ``rel_prefix`` in ascending order; one LIST call per page.

        ``first_page`` keeps the first LIST small when the caller usually needs only
        the first few keys (the latest jobs); later pages are full size.
        """
        kwargs = {"Bucket": self.bucket, "Prefix": self.prefix + rel_prefix, "MaxKeys": min(first_page, PAGE)}
        if start_after:
            kwargs["StartAfter"] = self.prefix + start_after
        while True:
            try:
                page = self.client.list_objects_v2(**kwargs)
            except (ClientError, BotoCoreError) as exc:
                raise aws_error(exc, self.uri(rel_prefix)) from None
            yield [obj["Key"][len(self.prefix):] for obj in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return
            kwargs.pop("StartAfter", None)
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
            kwargs["MaxKeys"] = PAGE


class LocalLocation:
    """A local folder (``docker run -v``, ``make serve``)."""

    def __init__(self, root: str):
        self.root = Path(os.path.abspath(root.removeprefix("file://")))
        self.is_s3 = False

    def _path(self, rel: str) -> Path:
        path = self.root / rel
        if ".." in Path(rel).parts:
            raise CliError(f"invalid key {rel!r}", EXIT_USAGE)
        return path

    def uri(self, rel: str) -> str:
        return str(self._path(rel))

    def get(self, rel: str) -> bytes | None:
        try:
            return self._path(rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put(self, rel: str, data: bytes, content_type: str = "") -> str:
        write_bytes_atomic(self._path(rel), data)
        return self.uri(rel)

    def delete(self, rel: str) -> None:
        try:
            self._path(rel).unlink()
        except FileNotFoundError:
            pass

    def pages(self, rel_prefix: str, start_after: str | None = None, first_page: int = PAGE) -> Iterator[list[str]]:
        """Files under the folder part of ``rel_prefix`` (one level), ascending, in pages (``first_page`` unused: a listdir is one call)."""
        folder, _, name_prefix = rel_prefix.rpartition("/")
        base = self.root / folder if folder else self.root
        try:
            names = sorted(n for n in os.listdir(base) if n.startswith(name_prefix) and not n.startswith("."))
        except FileNotFoundError:
            names = []
        rels = [f"{folder}/{n}" if folder else n for n in names]
        if start_after:
            rels = [r for r in rels if r > start_after]
        for i in range(0, max(len(rels), 1), PAGE):
            yield rels[i:i + PAGE]


def open_location(uri: str, s3_factory) -> S3Location | LocalLocation:
    """``s3://…`` → :class:`S3Location`; anything else is a local folder."""
    if uri.startswith("s3://"):
        return S3Location(uri, s3_factory())
    if "://" in uri and not uri.startswith("file://"):
        raise CliError(f"output must be s3://bucket/prefix/ or a local folder, got {uri!r}", EXIT_USAGE)
    return LocalLocation(uri)
