"""Which S3 locations the server may read models from: an allow-list checked before any I/O.

A request may name a model by URI (``s3://bucket/key``); without a fence, that is a way to
make the endpoint's IAM role read any object it can reach. ``ALLOWED_S3_PREFIXES`` lists
``s3://bucket/prefix/`` entries (comma- or space-separated); the model store's own prefix
is always allowed. Matching is by whole path segments: ``s3://b/models/`` allows
``s3://b/models/x`` but not ``s3://b/models-private/x``.
"""

from __future__ import annotations

import re

from model_cache.s3 import parse_s3_uri
from pipelines.errors import Forbidden, InvalidParameter

# Separators in disguise: percent-encoded "/" or "\" (also double-encoded), and backslashes.
_ENCODED_SEPARATOR = re.compile(r"%(25)*(2f|5c)", re.IGNORECASE)


def parse_prefixes(setting: str | list[str] | None) -> list[str]:
    """``"s3://a/x/, s3://b/"`` → ``["s3://a/x/", "s3://b/"]``; each entry validated as an S3 URI."""
    if not setting:
        return []
    items = setting if isinstance(setting, list) else re.split(r"[,\s]+", setting)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        bucket, prefix = parse_s3_uri(item, field="allowed_s3_prefixes")
        if prefix and not prefix.endswith("/"):
            prefix += "/"  # a prefix names a folder: "models" must not allow "models-private/"
        out.append(f"s3://{bucket}/{prefix}")
    return out


def check_uri_syntax(uri: str, *, field: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``uri``, or InvalidParameter for ``..``, encoded separators, backslashes, control chars."""
    if isinstance(uri, str) and _ENCODED_SEPARATOR.search(uri):
        raise InvalidParameter(f"S3 URI {uri!r} contains an encoded path separator", field=field)
    bucket, key = parse_s3_uri(uri, field=field)
    if not key or key.endswith("/"):
        raise InvalidParameter(f"S3 URI {uri!r} names a folder, not a model file", field=field)
    return bucket, key


class S3AllowList:
    """The set of ``s3://bucket/prefix/`` locations models may come from."""

    def __init__(self, prefixes: list[str]):
        self.prefixes = parse_prefixes(list(prefixes))

    def allows(self, bucket: str, key: str) -> bool:
        uri = f"s3://{bucket}/{key}"
        return any(uri.startswith(prefix) for prefix in self.prefixes)

    def check(self, uri: str, *, field: str = "models") -> tuple[str, str]:
        """``(bucket, key)`` when ``uri`` is well-formed and allowed; InvalidParameter / Forbidden otherwise. No I/O."""
        bucket, key = check_uri_syntax(uri, field=field)
        if not self.allows(bucket, key):
            allowed = ", ".join(self.prefixes) or "(none)"
            raise Forbidden(f"S3 location {uri} is outside the allowed model locations ({allowed}); see ALLOWED_S3_PREFIXES", field=field)
        return bucket, key
