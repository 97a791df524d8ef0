"""S3 → local file: parallel ranged GETs into one pre-sized temp file, retried, verified, renamed.

Why not ``boto3``'s ``download_file``: it does not pin the object version across parts and
checks nothing but the length. Here:

* the object is cut into ``part_size`` ranges fetched by ``concurrency`` threads, each
  reading the socket straight into one reused 64 KiB buffer (``readinto``) and ``pwrite``-ing
  it at its offset (one writer at a time) — no full-file (or even full-part) copy in memory; connections go back
  to the pool after each range;
* every GET carries ``If-Match: <etag>``, so a concurrent overwrite cannot splice two
  versions together (it raises :class:`ObjectChanged`);
* transient failures (connection drops, timeouts, 5xx, throttling) retry with exponential
  backoff and jitter, resuming the range where it stopped; at most ``retries`` times per part;
* integrity (:mod:`model_cache.download_checks`): the byte count always; for a single-part ETag (a plain MD5) the MD5 of the file
  is computed while the parts land, by a thread that follows the contiguous written prefix;
  a multipart ETag (``<md5-of-md5s>-<parts>``) cannot be checked without the upload's part
  sizes, so then the size and the part count (``HEAD ?partNumber=1`` → ``PartsCount``) are;
  SSE-KMS / SSE-C objects (ETag not an MD5) get the size check;
* with ``fsync``, each finished range is flushed while the others still download, and the
  file once more before the rename (a crash never leaves a renamed file with missing data);
* only a complete, verified file is renamed onto ``dest``; on any failure the temp file goes.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from model_cache.download_checks import Md5Follower, check_mode, check_parts
from model_cache.s3 import IncompleteDownload, ObjectChanged, is_not_found
from pipelines.errors import GenerationFailed, ModelNotFound

log = logging.getLogger(__name__)

# Per-thread read buffer. Small enough that the bytes recv just wrote are still in the CPU cache
# when pwrite copies them into the page cache: with 1 MiB buffers that copy dominated the profile
# and a 2 GiB download took ~5.5 s on a 2-core VM; 64 KiB gave 2.4–2.7 s, 128 KiB 2.5–3.8 s
# (interleaved A/B runs, s5cmd 2.75–2.95 s on the same object).
_BUFFER = 64 * 1024
_MIN_SPLIT = 8 * 1024 * 1024  # never cut ranges smaller than this just to feed more streams
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
    "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed",
}
_TRANSIENT_ERRORS = (
    ConnectionError,  # ConnectionResetError & co. raised by the socket under urllib3
    TimeoutError,
    EndpointConnectionError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ReadTimeoutError,
    IncompleteReadError,
    ResponseStreamingError,
)


def default_concurrency() -> int:
    """Four streams per CPU core, 8 to 16.

    One S3 connection carries ~100 MB/s, so a big instance needs many to fill its network;
    each stream is also a Python thread whose every ``recv`` needs the GIL back, so past a
    point more threads only add contention (on 2 busy cores, 8 × 64 MiB ranges beat both
    4 × 64 MiB and 8 × 16 MiB on a 2 GiB object).
    """
    return max(8, min(16, 4 * (os.cpu_count() or 2)))


@dataclass(frozen=True)
class TransferConfig:
    """How to fetch: parallelism, range size, retry budget. Defaults suit 1–10 GB checkpoints."""

    concurrency: int | None = None  # None: default_concurrency()
    part_size: int = 64 * 1024 * 1024  # upper bound: smaller objects are cut so every stream gets a range
    retries: int = 5  # per part, after the first attempt
    backoff_base: float = 0.25  # seconds; doubles per retry, with full jitter
    backoff_max: float = 8.0
    fsync: bool = True  # the rename must not become durable before the data
    sync_parts: bool = True  # with fsync: flush each finished part while the others still download


@dataclass(frozen=True)
class TransferResult:
    """What one download did, for logs and stats."""

    size: int
    seconds: float
    parts: int
    retries: int
    verified: str  # "md5", "size+parts" or "size"


class TransferFailed(GenerationFailed):
    """The object could not be downloaded within the retry budget; the message names it and the last error."""


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: dropped or refused connections, timeouts, 5xx, throttling."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    return isinstance(exc, _TRANSIENT_ERRORS)


class _Download:
    """One object's transfer: shared state of the part workers."""

    def __init__(self, client, bucket: str, key: str, etag: str | None, size: int, fd: int, config: TransferConfig):
        self.client, self.bucket, self.key, self.etag, self.fd, self.config = client, bucket, key, etag, fd, config
        self.size = size
        self.etag_not_md5 = False  # SSE-KMS / SSE-C: the ETag is not the MD5 of the bytes
        self.uri = f"s3://{bucket}/{key}"
        self.abort = threading.Event()
        self.retries = 0
        self._lock = threading.Lock()
        self.write_lock = threading.Lock()  # see _stream: one writer at a time

    def _get(self, start: int, end: int):
        kwargs = {"Bucket": self.bucket, "Key": self.key, "Range": f"bytes={start}-{end}"}
        if self.etag:
            kwargs["IfMatch"] = f'"{self.etag}"'
        try:
            return self.client.get_object(**kwargs)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412 or exc.response.get("Error", {}).get("Code") == "PreconditionFailed":
                raise ObjectChanged(f"{self.uri} changed while downloading (etag {self.etag} no longer current)") from exc
            if is_not_found(exc):
                raise ModelNotFound(f"{self.uri} no longer exists") from exc
            if status == 416:
                raise IncompleteDownload(f"{self.uri} is shorter than the expected {self.size} bytes") from exc
            raise

    def _stream(self, pos: list[int], end: int, buffer: bytearray) -> None:
        """GET ``[pos[0], end]`` once, writing what arrives and advancing ``pos[0]`` (kept even when this raises)."""
        response = self._get(pos[0], end)
        body = response["Body"]
        if response.get("ServerSideEncryption", "").startswith("aws:kms") or response.get("SSECustomerAlgorithm"):
            self.etag_not_md5 = True
        total = _content_range_total(response.get("ContentRange"))
        if total is not None and total != self.size:
            body.close()
            raise IncompleteDownload(f"{self.uri} has {total} bytes, expected {self.size}")
        view = memoryview(buffer)
        readinto = _direct_readinto(body, response)
        try:
            while pos[0] <= end:
                if self.abort.is_set():
                    raise _Aborted()
                count = readinto(view[: min(len(buffer), end + 1 - pos[0])])
                if not count:
                    break
                written = 0
                # One writer at a time: concurrent pwrites to one file contend on the inode lock in the
                # kernel, where waiters spin (measured: a fifth of the CPU); a Python lock makes them sleep.
                with self.write_lock:
                    while written < count:  # pwrite may write less than asked (signals, quotas)
                        written += os.pwrite(self.fd, view[written:count], pos[0] + written)
                pos[0] += count
        except BaseException:
            body.close()  # a half-read connection cannot be reused
            raise
        _release(body, readinto)

    def fetch_part(self, start: int, end: int) -> None:
        """Fetch ``[start, end]`` (inclusive), resuming after transient errors, ≤ ``retries`` retries."""
        buffer = bytearray(_BUFFER)
        pos, attempt = [start], 0
        while True:
            try:
                self._stream(pos, end, buffer)
                if pos[0] > end:
                    return
                raise IncompleteReadError(actual_bytes=pos[0] - start, expected_bytes=end + 1 - start)
            except _Aborted:
                raise
            except Exception as exc:
                if not is_transient(exc) or attempt >= self.config.retries or self.abort.is_set():
                    if is_transient(exc):
                        raise TransferFailed(
                            f"could not download {self.uri}: {type(exc).__name__}: {exc} "
                            f"(gave up after {attempt + 1} attempts on bytes {pos[0]}-{end})"
                        ) from exc
                    raise
                attempt += 1
                with self._lock:
                    self.retries += 1
                delay = random.uniform(0, min(self.config.backoff_max, self.config.backoff_base * 2 ** (attempt - 1)))
                log.warning("%s bytes %d-%d: %s; retry %d/%d in %.2f s", self.uri, pos[0], end, exc, attempt, self.config.retries, delay)
                if self.abort.wait(delay):
                    raise _Aborted() from None


def _direct_readinto(body, response: dict):
    """The fastest ``readinto`` for a GetObject body: socket → our buffer in one copy.

    botocore's ``StreamingBody.readinto`` goes through urllib3, whose ``readinto`` is
    ``read()`` + copy: two extra copies and a fresh bytes object per call, which on a 2-core
    machine costs a third of the throughput. The body is undecoded bytes with a
    Content-Length either way (botocore never asks urllib3 to decode), so reading the
    underlying ``http.client`` response directly yields the same bytes; a short body shows as
    ``0`` early and is retried like any dropped connection. Falls back to the public path
    when the internals are not what we expect (another HTTP stack, a wrapped body in tests).
    """
    raw = getattr(getattr(body, "_raw_stream", None), "_fp", None)
    encoded = (response.get("ContentEncoding") or "identity").lower() not in ("", "identity")
    if raw is None or encoded or not callable(getattr(raw, "readinto", None)):
        return body.readinto
    return raw.readinto


def _release(body, readinto) -> None:
    """Give a fully read connection back to the pool (closing it would cost a TCP+TLS handshake per part)."""
    raw = getattr(body, "_raw_stream", None)
    if raw is not None and readinto is not body.readinto and callable(getattr(raw, "release_conn", None)):
        fp = getattr(raw, "_fp", None)
        if fp is None or getattr(fp, "isclosed", lambda: False)():  # http.client saw the whole body
            raw.release_conn()
            return
    body.close()


def _content_range_total(header: str | None) -> int | None:
    """``"bytes 0-99/1234"`` → ``1234``; ``None`` when absent or ``*``."""
    if not header or "/" not in header:
        return None
    total = header.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


class _Aborted(Exception):
    """Another part failed; this one stops early (never surfaces to callers)."""


def _presize(fd: int, size: int) -> None:
    """Set the final length up front (sparse), so every range can ``pwrite`` at its offset.

    Not ``posix_fallocate``: on ext4 it makes "unwritten" extents that must be converted at
    writeback, which measured ~40 % slower for a 2 GiB download; running out of space is
    checked before the download by the disk tier's free-space floor instead.
    """
    os.ftruncate(fd, size)


def download(
    client,
    bucket: str,
    key: str,
    dest: Path,
    size: int,
    etag: str | None,
    config: TransferConfig = TransferConfig(),
) -> TransferResult:
    """Download ``s3://bucket/key`` (``size`` bytes, version ``etag``) to ``dest``, atomically.

    The temp file is ``.<name>.<random>.part`` in ``dest``'s folder (same filesystem, so the
    final ``os.replace`` is atomic; :meth:`model_cache.disk.DiskCache.sweep` removes leftovers
    of a crash). Raises :class:`TransferFailed` when the retry budget is spent,
    :class:`ObjectChanged` when the object was overwritten, :class:`IncompleteDownload` when
    the bytes do not verify; ``dest`` is then untouched and no temp file remains.
    """
    started = time.perf_counter()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    mode = check_mode(etag)
    streams = int(config.concurrency or default_concurrency())
    # Big ranges cost fewer requests (measured: 64 MiB beat 16 MiB by ~30 % on a 2 GiB object),
    # but an object must still be cut into at least one range per stream.
    part_size = max(1, min(int(config.part_size), max(_MIN_SPLIT, -(-size // streams))))
    ranges = [(s, min(s + part_size, size) - 1) for s in range(0, size, part_size)]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    job = _Download(client, bucket, key, etag, size, fd, config)
    try:
        if size:
            _presize(fd, size)
        follower = Md5Follower(fd, ranges, buffer_size=_BUFFER * 4) if mode == "md5" else None
        workers = max(1, min(streams, len(ranges)))
        with ThreadPoolExecutor(max_workers=workers + (1 if follower else 0), thread_name_prefix="s3-part") as pool:
            md5_future = pool.submit(follower.run) if follower else None

            def one(index: int, start: int, end: int) -> None:
                job.fetch_part(start, end)
                if config.fsync and config.sync_parts:
                    # Writeback overlaps the transfer instead of all landing in the final fsync.
                    getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync
                if follower:
                    follower.part_done(index)

            futures = [pool.submit(one, i, s, e) for i, (s, e) in enumerate(ranges)]
            try:
                done, _pending = wait(futures, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        raise future.exception()
            except BaseException:
                job.abort.set()  # running parts stop at their next chunk; queued ones are cancelled
                for future in futures:
                    future.cancel()
                if follower:
                    follower.fail()
                raise
            md5 = md5_future.result() if md5_future else None
        on_disk = os.fstat(fd).st_size
        if on_disk != size:
            raise IncompleteDownload(f"{job.uri}: {on_disk} bytes on disk, expected {size}")
        if mode == "md5" and job.etag_not_md5:
            mode = "size"
        if mode == "md5" and md5 != etag:
            raise IncompleteDownload(f"{job.uri}: MD5 {md5} of the downloaded bytes does not match the ETag {etag}")
        if mode == "size+parts":
            check_parts(client, job.bucket, job.key, job.size, etag)
        if config.fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would hide the cache from other users of the volume
        os.replace(tmp_name, dest)
        tmp_name = None
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
    seconds = time.perf_counter() - started
    result = TransferResult(size=size, seconds=seconds, parts=len(ranges), retries=job.retries, verified=mode)
    log.info(
        "downloaded %s: %d bytes in %.2f s (%.0f MiB/s, %d parts, %d retries, verified %s)",
        job.uri, size, seconds, size / max(seconds, 1e-9) / 2**20, len(ranges), job.retries, mode,
    )
    return result
