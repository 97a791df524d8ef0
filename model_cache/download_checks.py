"""What a finished S3 download is checked against: which check its ETag allows, the MD5 of the bytes
(hashed in order while parts still land), and a multipart object's part count."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading

from botocore.exceptions import ClientError

from model_cache.s3 import IncompleteDownload

log = logging.getLogger(__name__)

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-(?P<parts>\d+)$")


def check_mode(etag: str | None) -> str:
    """Which integrity check the ETag allows (SSE-KMS/SSE-C objects are downgraded once a GET shows it)."""
    if not etag:
        return "size"
    if _MD5_ETAG.match(etag):
        return "md5"
    if _MULTIPART_ETAG.match(etag):
        return "size+parts"
    return "size"


class Md5Follower:
    """Hashes the file in order as contiguous parts complete (parts finish out of order)."""

    def __init__(self, fd: int, ranges: list[tuple[int, int]], *, buffer_size: int = 512 * 1024):
        self._fd, self._ranges, self._buffer_size = fd, ranges, buffer_size
        self._done = [False] * len(ranges)
        self._cond = threading.Condition()
        self._failed = False
        self.digest = hashlib.md5()

    def part_done(self, index: int) -> None:
        with self._cond:
            self._done[index] = True
            self._cond.notify()

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify()

    def run(self) -> str | None:
        """Hash every part in order; ``None`` if the transfer failed first."""
        buffer = bytearray(self._buffer_size)
        view = memoryview(buffer)
        for index, (start, end) in enumerate(self._ranges):
            with self._cond:
                while not (self._done[index] or self._failed):
                    self._cond.wait()
                if self._failed:
                    return None
            offset = start
            while offset <= end:
                count = os.preadv(self._fd, [view[: min(len(buffer), end + 1 - offset)]], offset)
                if count <= 0:
                    raise IncompleteDownload(f"short read while hashing at offset {offset}")
                self.digest.update(view[:count])  # hashlib releases the GIL for large buffers
                offset += count
        return self.digest.hexdigest()


def check_parts(client, bucket: str, key: str, size: int, etag: str) -> None:
    """A multipart ETag (``<md5 of part md5s>-<N>``) cannot be checked against the bytes without the
    upload's part layout; check what can be: N is plausible for the size, and the object really has N parts."""
    uri = f"s3://{bucket}/{key}"
    parts = int(_MULTIPART_ETAG.match(etag).group("parts"))
    # S3 parts are ≥ 1 byte and ≤ 5 GiB, at most 10,000 of them: a count outside that is not this object.
    if not (1 <= parts <= 10000 and parts <= max(size, 1) and size <= parts * 5 * 1024**3):
        raise IncompleteDownload(f"{uri}: {size} bytes cannot be {parts} multipart parts (ETag {etag})")
    try:
        head = client.head_object(Bucket=bucket, Key=key, PartNumber=1, IfMatch=f'"{etag}"')
    except ClientError as exc:  # servers without PartNumber support: the size check stands alone
        log.debug("%s: no part count available (%s)", uri, exc)
        return
    count, first = head.get("PartsCount"), head.get("ContentLength")
    if count is not None and int(count) != parts:
        raise IncompleteDownload(f"{uri}: the object has {count} parts, its ETag {etag} says {parts}")
    if first is not None and not (0 < int(first) <= size):
        raise IncompleteDownload(f"{uri}: first part of {first} bytes does not fit a {size}-byte object")
