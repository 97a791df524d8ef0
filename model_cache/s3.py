"""Thin, safe S3 helpers: client construction, URI parsing, atomic upload (downloads: :mod:`model_cache.transfer`).

The client is always passed in (never a module global) so tests point it at a real
SeaweedFS and can wrap it to count or break calls. Two invariants matter here:

* a downloaded file appears at its final path only when complete and of the expected
  size (temp file in the same folder + ``os.replace``), so a crash or a dropped
  connection never leaves a truncated checkpoint that looks cached;
* an upload carries ``Content-MD5``, so S3 rejects bytes corrupted in flight; a single
  PUT is atomic on S3 (the object is visible whole or not at all).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from pipelines.errors import InvalidParameter

log = logging.getLogger(__name__)

# S3 bucket naming rules (the subset that matters for safety): 3–63 chars of lowercase
# letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class ObjectChanged(Exception):
    """The object's etag no longer matches the one we were asked to download (HTTP 412)."""


class IncompleteDownload(OSError):
    """The bytes received do not add up to the expected size."""


def make_s3_client(endpoint_url: str | None = None, region: str | None = None, max_attempts: int = 5):
    """A boto3 S3 client: standard retries, path-style addressing when ``endpoint_url`` is set.

    ``endpoint_url`` is for S3-compatible servers (SeaweedFS, MinIO), which rarely do
    virtual-host buckets; ``None`` means AWS itself. Credentials come from the usual
    AWS chain (env, profile, instance/SageMaker role).
    """
    options: dict = {"retries": {"mode": "standard", "max_attempts": max_attempts}, "max_pool_connections": 64}
    if endpoint_url:
        options["s3"] = {"addressing_style": "path"}
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=Config(**options)
    )


def parse_s3_uri(uri: str, *, field: str = "uri") -> tuple[str, str]:
    """``"s3://bucket/some/prefix/"`` → ``("bucket", "some/prefix/")``; the prefix may be empty.

    Raises InvalidParameter (naming ``field``) for anything that is not a plain s3 URI:
    wrong scheme, bad bucket name, control characters, backslashes, or ``.``/``..`` key
    segments (keys are mirrored onto the local disk cache, so they must stay paths).
    """
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise InvalidParameter(f"not an s3:// URI: {uri!r}", field=field)
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise InvalidParameter(f"invalid S3 bucket name {bucket!r} in {uri!r}", field=field)
    if any(ord(c) < 32 or ord(c) == 127 for c in key) or "\\" in key:
        raise InvalidParameter(f"S3 key in {uri!r} contains control characters or backslashes", field=field)
    segments = key.split("/")
    # An empty last segment is the trailing "/" of a prefix; empty segments elsewhere ("a//b")
    # would collapse on the local disk, so two keys could share one cache file.
    if any(seg in (".", "..") for seg in segments) or any(seg == "" for seg in segments[:-1]):
        raise InvalidParameter(f"S3 key in {uri!r} has an empty, '.' or '..' segment", field=field)
    return bucket, key


def md5_b64(data: bytes) -> str:
    """Base64 MD5 digest, the form the ``Content-MD5`` header wants."""
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def put_bytes(client, bucket: str, key: str, data: bytes, content_type: str) -> str:
    """Upload ``data`` in one PUT with ``Content-MD5`` (S3 rejects corrupted bytes); return the etag."""
    response = client.put_object(
        Bucket=bucket, Key=key, Body=data, ContentType=content_type, ContentMD5=md5_b64(data)
    )
    return response.get("ETag", "").strip('"')


def is_not_found(exc: ClientError) -> bool:
    """True for S3's "no such key/bucket" answers (HEAD gives a bare 404 without a code)."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket") or status == 404
