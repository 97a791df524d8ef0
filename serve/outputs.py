"""Job outputs: ``<OUTPUT>/<job_id>/<name>`` in a local folder or under an S3 prefix.

Every write is all-or-nothing, because job listings read these files while jobs
are still running: a reader sees the previous ``job.json`` or the new one, never half
of one. Locally that is a temp file plus ``os.replace``; on S3 a single PUT is already
atomic, and ``Content-MD5`` makes S3 refuse bytes corrupted on the way.

Job ids and file names come from clients, so both are validated before they are
joined to a path or key.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from botocore.exceptions import ClientError

from model_cache.atomic import write_bytes_atomic
from model_cache.s3 import is_not_found, parse_s3_uri, put_bytes
from pipelines.errors import InvalidParameter

_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# a segment of a root-relative key (index entries are longer than job ids)
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,250}$")
#: Folders under the output root that are not jobs.
RESERVED = frozenset({"_index"})


def check_job_id(job_id: str, *, field: str = "id") -> str:
    """Return ``job_id`` if it is 1–128 of ``[A-Za-z0-9._-]`` and not ``.``/``..``; else InvalidParameter."""
    if not isinstance(job_id, str) or not _SAFE.match(job_id) or job_id in (".", "..") or job_id in RESERVED:
        raise InvalidParameter(
            f"job id {job_id!r} must be 1-128 characters of letters, digits, '.', '_' or '-' (and not '.', '..' or '_index')",
            field=field,
        )
    return job_id


def _check_key(key: str) -> str:
    """A root-relative key like ``_index/<name>``: safe segments only, no ``.``/``..``."""
    parts = key.split("/") if isinstance(key, str) else [None]
    if not all(isinstance(p, str) and _SEGMENT.match(p) and p not in (".", "..") for p in parts):
        raise InvalidParameter(f"invalid output key {key!r}", field="key")
    return key


def _check_name(name: str) -> str:
    # Names are ours ("image-0.png", "job.json"), but the same rule keeps a bug from writing elsewhere.
    return check_job_id(name, field="name")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str).encode("utf-8")


@runtime_checkable
class OutputWriter(Protocol):
    """Where job files go. ``uri`` is for humans and records; the other methods do the I/O."""

    description: str

    def uri(self, job_id: str, name: str) -> str: ...

    def put_bytes(self, job_id: str, name: str, data: bytes, content_type: str) -> str: ...

    def put_json(self, job_id: str, name: str, obj: Any) -> str: ...

    def get_json(self, job_id: str, name: str) -> dict | None: ...

    def list_job_ids(self) -> list[str]: ...

    def get_bytes(self, job_id: str, name: str) -> bytes | None: ...

    def exists(self, job_id: str, name: str) -> bool: ...

    def put_key(self, key: str, data: bytes = b"") -> None: ...

    def delete_key(self, key: str) -> None: ...

    def list_prefix(self, prefix: str) -> list[str]: ...


class _JsonFiles:
    """JSON on top of a backend's ``put_bytes`` / ``get_bytes``."""

    def put_json(self, job_id: str, name: str, obj: Any) -> str:
        return self.put_bytes(job_id, name, _dumps(obj), "application/json")

    def get_json(self, job_id: str, name: str) -> dict | None:
        """The parsed file, or None when it does not exist."""
        data = self.get_bytes(job_id, name)
        return None if data is None else json.loads(data)


class LocalOutputs(_JsonFiles):
    """Outputs in a local folder (``docker run -v``, plain Python runs)."""

    def __init__(self, root: Path):
        self.root = Path(os.path.abspath(root))
        self.description = f"local folder {self.root}"

    def _path(self, job_id: str, name: str) -> Path:
        return self.root / check_job_id(job_id) / _check_name(name)

    def uri(self, job_id: str, name: str) -> str:
        """Absolute path of the file."""
        return str(self._path(job_id, name))

    def put_bytes(self, job_id: str, name: str, data: bytes, content_type: str) -> str:
        """Write atomically (temp file + ``os.replace``); ``content_type`` has no meaning on disk."""
        path = self._path(job_id, name)
        write_bytes_atomic(path, data)
        return str(path)

    def get_bytes(self, job_id: str, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            return self._path(job_id, name).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, job_id: str, name: str) -> bool:
        return self._path(job_id, name).is_file()

    def put_key(self, key: str, data: bytes = b"") -> None:
        """Write a root-relative key (index entries); atomic like every other write."""
        write_bytes_atomic(self.root / _check_key(key), data)

    def delete_key(self, key: str) -> None:
        """Remove a root-relative key; absent is fine (as S3's DELETE)."""
        (self.root / _check_key(key)).unlink(missing_ok=True)

    def list_prefix(self, prefix: str) -> list[str]:
        """Root-relative keys starting with ``prefix`` (one folder level, e.g. ``_index/``), sorted."""
        folder, _, start = prefix.rpartition("/")
        base = self.root / _check_key(folder) if folder else self.root
        if not base.is_dir():
            return []
        lead = f"{folder}/" if folder else ""
        # temp files of atomic writes start with "." and are not keys
        return sorted(lead + p.name for p in base.iterdir() if p.is_file() and p.name.startswith(start) and not p.name.startswith("."))

    def list_job_ids(self) -> list[str]:
        """Job folders present (unordered meaning; callers sort by their records)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and _SAFE.match(p.name) and p.name not in (".", "..") and p.name not in RESERVED
        )


class S3Outputs(_JsonFiles):
    """Outputs under ``s3://bucket/prefix/`` (SageMaker async endpoints, shared buckets)."""

    def __init__(self, uri: str, client):
        bucket, prefix = parse_s3_uri(uri, field="output.uri")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket, self.prefix, self.client = bucket, prefix, client
        self.description = f"s3://{bucket}/{prefix}"

    def _key(self, job_id: str, name: str) -> str:
        return f"{self.prefix}{check_job_id(job_id)}/{_check_name(name)}"

    def uri(self, job_id: str, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(job_id, name)}"

    def put_bytes(self, job_id: str, name: str, data: bytes, content_type: str) -> str:
        """One PUT with Content-MD5: atomic, and refused by S3 if the bytes were corrupted."""
        put_bytes(self.client, self.bucket, self._key(job_id, name), data, content_type)
        return self.uri(job_id, name)

    def get_bytes(self, job_id: str, name: str) -> bytes | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(job_id, name))["Body"]
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise
        try:
            return body.read()
        finally:
            body.close()

    def exists(self, job_id: str, name: str) -> bool:
        """One HEAD request."""
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(job_id, name))
        except ClientError as exc:
            if is_not_found(exc):
                return False
            raise
        return True

    def put_key(self, key: str, data: bytes = b"") -> None:
        put_bytes(self.client, self.bucket, self.prefix + _check_key(key), data, "application/octet-stream")

    def delete_key(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + _check_key(key))

    def list_prefix(self, prefix: str) -> list[str]:
        """Root-relative keys starting with ``prefix`` (S3 order: ascending), all pages."""
        folder = prefix.rpartition("/")[0]
        if folder:
            _check_key(folder)
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            keys.extend(obj["Key"][len(self.prefix):] for obj in page.get("Contents", []))
        return keys

    def list_job_ids(self) -> list[str]:
        """Job "folders" under the prefix (one LIST with a delimiter, paginated)."""
        ids: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                job_id = common["Prefix"][len(self.prefix):].rstrip("/")
                if _SAFE.match(job_id) and job_id not in (".", "..") and job_id not in RESERVED:
                    ids.append(job_id)
        return sorted(ids)


def open_output(uri: str, s3_client_factory: Callable[[], object], *, field: str = "output.uri") -> OutputWriter:
    """``s3://bucket/prefix/`` → :class:`S3Outputs`; a path or ``file://`` → :class:`LocalOutputs`."""
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidParameter("output location is empty", field=field)
    if uri.startswith("s3://"):
        parse_s3_uri(uri, field=field)  # validate with the caller's field name before making a client
        return S3Outputs(uri, s3_client_factory())
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise InvalidParameter(f"output location must be s3://bucket/prefix/ or a local folder, got {uri!r}", field=field)
    return LocalOutputs(Path(uri))
