"""Model store commands: list what is there, upload a file with its sha256.

Uploads go to ``<store>/<kind>/<name>``: S3 in one PUT below :data:`MULTIPART_CHUNK`,
else as a resumable multipart upload (:mod:`client.upload`), with the sha256 as object
metadata ``sha256``; a local store gets an atomic copy. A name that exists with other
content is refused unless ``force``; the same content is "already there".
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from client.config import EXIT_USAGE, CliError
from client.storage import aws_error
from model_cache import names
from model_cache.s3 import is_not_found, parse_s3_uri
from pipelines.errors import InvalidParameter

_CHUNK = 8 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, reporting bytes read to ``progress``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def target_name(path: Path, kind: str, name: str | None) -> str:
    """The store-relative name (``sub/x.safetensors``), validated; the extension must suit ``kind``."""
    try:
        names.check_kind(kind, field="--type")
        clean, _hash = names.clean_name(name or path.name, field="--name")
    except InvalidParameter as exc:
        raise CliError(exc.message, EXIT_USAGE) from None
    if not names.has_extension(kind, clean):
        raise CliError(f"{clean!r}: a {kind} file must end with one of {', '.join(names.EXTENSIONS[kind])}", EXIT_USAGE)
    return clean


@dataclass
class UploadResult:
    location: str
    sha256: str
    uploaded: bool  # False: the same content was already there


def _s3_existing_sha(client, bucket: str, key: str) -> tuple[bool, str | None]:
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc) and exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
            return False, None
        raise aws_error(exc, f"s3://{bucket}/{key}") from None
    except BotoCoreError as exc:
        raise aws_error(exc, f"s3://{bucket}/{key}") from None
    return True, (head.get("Metadata") or {}).get("sha256")


def upload(
    store_uri: str,
    path: Path,
    kind: str,
    *,
    name: str | None = None,
    force: bool = False,
    s3_factory: Callable[[], object],
    hash_progress: Callable[[int], None] | None = None,
    upload_progress: Callable[[int], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> UploadResult:
    """Upload ``path`` as ``<store>/<kind>/<name>``; see the module docstring for the rules."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"{path}: no such file", EXIT_USAGE)
    rel = f"{kind}/{target_name(path, kind, name)}"
    sha = sha256_file(path, hash_progress)
    if store_uri.startswith("s3://"):
        try:
            bucket, prefix = parse_s3_uri(store_uri, field="--models")
        except InvalidParameter as exc:
            raise CliError(exc.message, EXIT_USAGE) from None
        prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        key, client = prefix + rel, s3_factory()
        location = f"s3://{bucket}/{key}"
        exists, old_sha = _s3_existing_sha(client, bucket, key)
        if exists and old_sha == sha:
            from client.upload import ResumableUpload

            # an interrupted upload of the same name is no longer needed
            ResumableUpload(client, bucket, key, path, sha, part_size=MULTIPART_CHUNK).forget()
            return UploadResult(location, sha, uploaded=False)
        if exists and not force:
            raise CliError(
                f"{location} already exists with different content (sha256 {old_sha or 'unknown'}, yours {sha}); "
                "pass --force to replace it",
                EXIT_USAGE,
            )
        from client.upload import ResumableUpload

        resumable = ResumableUpload(client, bucket, key, path, sha, part_size=MULTIPART_CHUNK, progress=upload_progress,
                                    note=note)
        if resumable.size < MULTIPART_CHUNK:  # one PUT: nothing to resume
            try:
                with open(path, "rb") as body:
                    client.put_object(Bucket=bucket, Key=key, Body=body, Metadata={"sha256": sha})
            except (ClientError, BotoCoreError) as exc:
                raise aws_error(exc, location) from None
            if upload_progress:
                upload_progress(resumable.size)
        else:
            resumable.run()
        return UploadResult(location, sha, uploaded=True)
    root = Path(store_uri.removeprefix("file://"))
    dest = root / rel
    if dest.is_file():
        old_sha = sha256_file(dest)
        if old_sha == sha:
            return UploadResult(str(dest), sha, uploaded=False)
        if not force:
            raise CliError(f"{dest} already exists with different content (sha256 {old_sha}); pass --force to replace it", EXIT_USAGE)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
                if upload_progress:
                    upload_progress(len(chunk))
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return UploadResult(str(dest), sha, uploaded=True)


def list_models(store_uri: str, kinds: list[str], *, s3_factory: Callable[[], object]) -> list:
    """``ModelRef``s of each kind, through :func:`model_cache.store.open_store`."""
    from model_cache.store import open_store

    try:
        for kind in kinds:
            names.check_kind(kind, field="--type")
        store = open_store(store_uri, cache_dir=Path(tempfile.gettempdir()) / "sdctl-cache", s3_client_factory=s3_factory)
    except InvalidParameter as exc:
        raise CliError(exc.message, EXIT_USAGE) from None
    refs = []
    try:
        for kind in kinds:
            refs.extend(store.list(kind))
    except (ClientError, BotoCoreError) as exc:
        raise aws_error(exc, store.description) from None
    return refs

