"""Resumable S3 multipart upload of one local file.

An interrupted upload (Ctrl-C, network loss, a crash) is picked up by the next run
of the same command: the upload is remembered in a small state file (bucket, key,
``UploadId``, part size, and the local file's size, mtime and sha256), the parts
S3 already holds are listed (``ListParts``) and each is checked against the local
bytes (its ETag is the MD5 of the part) and size; only missing or mismatching
parts are sent. A local file that changed since starts over (the old upload is
aborted). State files live in ``$SDCTL_STATE_DIR`` (default
``$XDG_CACHE_HOME/sdctl/uploads``, i.e. ``~/.cache/sdctl/uploads``) and are
removed when the upload completes.

Where S3 does not make part ETags MD5s (SSE-KMS buckets), no part verifies and a
re-run re-sends everything: slower, never wrong.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from client.config import EXIT_AWS, CliError
from client.storage import aws_error
from model_cache.atomic import write_bytes_atomic

STATE_ENV = "SDCTL_STATE_DIR"
MAX_PARTS = 10_000  # S3's limit
CONCURRENCY = 4  # parts in flight (each is held in memory while it is sent)
_MIB = 1024 * 1024


def state_dir() -> Path:
    """Where upload state files live (``$SDCTL_STATE_DIR``, else the user cache folder)."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "sdctl" / "uploads"


@dataclass
class UploadState:
    """One remembered multipart upload."""

    bucket: str
    key: str
    upload_id: str
    part_size: int
    size: int
    mtime_ns: int
    sha256: str

    def same_file(self, size: int, mtime_ns: int, sha256: str) -> bool:
        return (self.size, self.mtime_ns, self.sha256) == (size, mtime_ns, sha256)


class StateFile:
    """The state file of one destination (``bucket/key``)."""

    def __init__(self, bucket: str, key: str, folder: Path | None = None):
        name = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()[:40]
        self.path = (folder or state_dir()) / f"{name}.json"

    def read(self) -> UploadState | None:
        try:
            return UploadState(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, OSError):  # unreadable or from another version: forget it
            return None

    def write(self, state: UploadState) -> None:
        write_bytes_atomic(self.path, json.dumps(asdict(state), indent=2).encode(), mode=0o600)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def part_size_for(size: int, minimum: int) -> int:
    """``minimum``, or larger (whole MiB) when the file would need more than 10 000 parts."""
    return max(minimum, math.ceil(size / MAX_PARTS / _MIB) * _MIB)


def parts_of(size: int, part_size: int) -> list[tuple[int, int, int]]:
    """``(part number, offset, length)`` for every part; numbers start at 1."""
    return [(i // part_size + 1, i, min(part_size, size - i)) for i in range(0, size, part_size)]


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def _is_no_such_upload(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("NoSuchUpload", "404") or \
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404


class ResumableUpload:
    """Upload ``path`` to ``s3://bucket/key`` in parts, resuming a remembered upload of the same file."""

    def __init__(self, client, bucket: str, key: str, path: Path, sha256: str, *, part_size: int,
                 progress: Callable[[int], None] | None = None, note: Callable[[str], None] | None = None,
                 state_folder: Path | None = None, concurrency: int | None = None):
        self.client, self.bucket, self.key, self.path, self.sha256 = client, bucket, key, Path(path), sha256
        stat = self.path.stat()
        self.size, self.mtime_ns = stat.st_size, stat.st_mtime_ns
        self.part_size = part_size_for(self.size, part_size)
        self.progress = progress or (lambda n: None)
        self.note = note or (lambda text: None)
        self.state_file = StateFile(bucket, key, state_folder)
        self.concurrency = concurrency or CONCURRENCY
        self.location = f"s3://{bucket}/{key}"
        self.resumed_parts = 0
        self.resumed_bytes = 0
        self.sent_parts = 0

    # -- S3 calls, each turned into an actionable error -----------------------------
    def _call(self, what: str, func, **kwargs):
        try:
            return func(Bucket=self.bucket, Key=self.key, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"{self.location} ({what})") from None

    def _listed_parts(self, upload_id: str) -> dict[int, list[dict]] | None:
        """Parts S3 holds for ``upload_id`` by number; None when the upload no longer exists.

        AWS keeps only the latest upload of a part number; some S3 servers (SeaweedFS)
        list every upload of it, hence a list per number.
        """
        parts: dict[int, list[dict]] = {}
        kwargs: dict = {"UploadId": upload_id}
        while True:
            try:
                page = self.client.list_parts(Bucket=self.bucket, Key=self.key, **kwargs)
            except ClientError as exc:
                if _is_no_such_upload(exc):
                    return None
                raise aws_error(exc, f"{self.location} (ListParts)") from None
            except BotoCoreError as exc:
                raise aws_error(exc, f"{self.location} (ListParts)") from None
            for part in page.get("Parts", []):
                parts.setdefault(part["PartNumber"], []).append(part)
            if not page.get("IsTruncated"):
                return parts
            kwargs["PartNumberMarker"] = page["NextPartNumberMarker"]

    def forget(self) -> None:
        """Abort a remembered upload of this destination (if any) and delete its state."""
        state = self.state_file.read()
        if state is not None:
            try:
                self.client.abort_multipart_upload(Bucket=state.bucket, Key=state.key, UploadId=state.upload_id)
            except ClientError as exc:
                if not _is_no_such_upload(exc):
                    raise aws_error(exc, f"{self.location} (AbortMultipartUpload)") from None
            except BotoCoreError as exc:
                raise aws_error(exc, f"{self.location} (AbortMultipartUpload)") from None
        self.state_file.clear()

    # -- the upload -------------------------------------------------------------------
    def _resume_or_start(self) -> tuple[str, dict[int, str]]:
        """``(upload id, {part number: etag} already there and verified)``."""
        state = self.state_file.read()
        if state is not None and (state.bucket, state.key) == (self.bucket, self.key):
            if state.same_file(self.size, self.mtime_ns, self.sha256):
                listed = self._listed_parts(state.upload_id)
                if listed is not None:
                    self.part_size = state.part_size  # the parts were cut with the original size
                    return state.upload_id, self._verified(listed)
                self.note("the interrupted upload is gone from S3 (aborted or expired): starting over")
            else:
                self.note("the local file changed since the interrupted upload: starting over")
                self.forget()
        created = self._call("CreateMultipartUpload", self.client.create_multipart_upload, Metadata={"sha256": self.sha256})
        upload_id = created["UploadId"]
        self.state_file.write(UploadState(self.bucket, self.key, upload_id, self.part_size, self.size, self.mtime_ns, self.sha256))
        return upload_id, {}

    def _verified(self, listed: dict[int, list[dict]]) -> dict[int, str]:
        done: dict[int, str] = {}
        for number, offset, length in parts_of(self.size, self.part_size):
            candidates = [p for p in listed.get(number, []) if p.get("Size") == length]
            if not candidates:
                continue
            md5 = hashlib.md5(_read(self.path, offset, length)).hexdigest()
            match = next((p for p in candidates if p.get("ETag", "").strip('"') == md5), None)
            if match is not None:
                done[number] = match["ETag"]  # completing with this ETag selects exactly these bytes
                self.resumed_parts += 1
                self.resumed_bytes += length
        if done:
            total = len(parts_of(self.size, self.part_size))
            self.note(f"resuming: {len(done)} of {total} parts ({self.resumed_bytes / _MIB:.1f} MiB) already uploaded and verified")
            self.progress(self.resumed_bytes)
        return done

    def _send(self, upload_id: str, number: int, offset: int, length: int) -> str:
        data = _read(self.path, offset, length)
        digest = hashlib.md5(data).digest()
        answer = self._call("UploadPart", self.client.upload_part, UploadId=upload_id, PartNumber=number, Body=data,
                            ContentMD5=base64.b64encode(digest).decode())
        self.progress(length)
        return answer["ETag"]

    def run(self) -> None:
        """Upload what is missing and complete the upload; the state file is removed on success."""
        upload_id, done = self._resume_or_start()
        todo = [p for p in parts_of(self.size, self.part_size) if p[0] not in done]
        total = len(parts_of(self.size, self.part_size))
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="sdctl-upload") as pool:
            futures = {pool.submit(self._send, upload_id, *part): part[0] for part in todo}
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:  # on a failure or Ctrl-C, stop handing out parts; those in flight finish
                for future in futures:
                    future.cancel()
        failure = None
        for future, number in futures.items():
            if future.cancelled():
                continue
            if future.exception() is None:
                done[number] = future.result()
                self.sent_parts += 1
            elif failure is None:
                failure = future.exception()
        if failure is not None:
            message = failure.message if isinstance(failure, CliError) else str(failure)
            raise CliError(f"{message} — upload interrupted with {len(done)} of {total} parts in S3; "
                           "run the same command again to resume", EXIT_AWS) from None
        parts = [{"PartNumber": n, "ETag": done[n]} for n in sorted(done)]
        self._call("CompleteMultipartUpload", self.client.complete_multipart_upload, UploadId=upload_id,
                   MultipartUpload={"Parts": parts})
        self.state_file.clear()
