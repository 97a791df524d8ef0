"""The S3 transfer against a real SeaweedFS: ranged parts, resume, integrity, a server that dies."""

import errno
import io
import os
import ssl
import time

import boto3
import pytest
from boto3.s3.transfer import TransferConfig as Boto3TransferConfig
from botocore.config import Config

from model_cache.s3 import IncompleteDownload, ObjectChanged, put_bytes
from model_cache import transfer
from model_cache.stream_pump import SocketBody
from model_cache.transfer import TransferConfig, TransferFailed, download, is_transient
from pipelines.errors import ModelNotFound
from tests.model_cache.proxy import DyingProxy, self_signed_tls
from tests.support.seaweed import ACCESS_KEY, REGION, SECRET_KEY

FAST = TransferConfig(concurrency=4, part_size=100_000, retries=2, backoff_base=0.01, fsync=False)


class _Body:
    """Wraps a streaming body: optionally flips one byte, or drops the connection after ``drop_after`` bytes."""

    def __init__(self, body, *, flip_at=None, drop_after=None):
        self._body, self._flip_at, self._drop_after, self._seen = body, flip_at, drop_after, 0

    def readinto(self, buffer):
        view = memoryview(buffer)[: 8192]
        if self._drop_after is not None and self._seen >= self._drop_after:
            raise ConnectionResetError("connection reset by peer (test)")
        count = self._body.readinto(view)
        if self._flip_at is not None and self._seen <= self._flip_at < self._seen + count:
            view[self._flip_at - self._seen] ^= 0xFF
        self._seen += count
        return count

    def close(self):
        self._body.close()


class FlakyClient:
    """A real client whose first ``drops`` GETs lose the connection midway; counts GETs and their ranges."""

    def __init__(self, client, *, drops=0, flip_at=None, sse=None):
        self._client, self.drops, self.flip_at, self.sse = client, drops, flip_at, sse
        self.ranges: list[str] = []

    def get_object(self, **kwargs):
        self.ranges.append(kwargs.get("Range", ""))
        response = self._client.get_object(**kwargs)
        if self.sse:
            response["ServerSideEncryption"] = self.sse
        if self.drops > 0:
            self.drops -= 1
            response["Body"] = _Body(response["Body"], drop_after=50_000)
        elif self.flip_at is not None:
            start = int(kwargs["Range"].split("=")[1].split("-")[0])
            end = int(kwargs["Range"].split("-")[1])
            if start <= self.flip_at <= end:
                response["Body"] = _Body(response["Body"], flip_at=self.flip_at - start)
        return response


def test_ranged_parts_verified_by_md5(s3_client, s3_bucket, tmp_path):
    data = os.urandom(1_000_003)
    etag = put_bytes(s3_client, s3_bucket, "m/x.bin", data, "application/octet-stream")
    dest = tmp_path / "d" / "x.bin"
    result = download(s3_client, s3_bucket, "m/x.bin", dest, len(data), etag, FAST)
    assert dest.read_bytes() == data
    assert os.listdir(dest.parent) == ["x.bin"]
    assert (result.parts, result.verified, result.retries) == (11, "md5", 0)


def test_dropped_connections_resume_where_they_stopped(s3_client, s3_bucket, tmp_path):
    data = os.urandom(400_000)
    etag = put_bytes(s3_client, s3_bucket, "k", data, "application/octet-stream")
    flaky = FlakyClient(s3_client, drops=2)
    result = download(flaky, s3_bucket, "k", tmp_path / "k", len(data), etag, FAST)
    assert (tmp_path / "k").read_bytes() == data
    assert result.retries == 2
    assert len(flaky.ranges) == 4 + 2
    # A retry asks only for what is missing, not the whole part again.
    starts = [int(r.split("=")[1].split("-")[0]) for r in flaky.ranges[4:]]
    assert all(start % 100_000 != 0 for start in starts)


def test_corrupted_bytes_fail_the_md5_and_leave_nothing(s3_client, s3_bucket, tmp_path):
    data = os.urandom(300_000)
    etag = put_bytes(s3_client, s3_bucket, "k", data, "application/octet-stream")
    with pytest.raises(IncompleteDownload, match="MD5"):
        download(FlakyClient(s3_client, flip_at=123_456), s3_bucket, "k", tmp_path / "k", len(data), etag, FAST)
    assert os.listdir(tmp_path) == []


def test_multipart_object_checked_by_size_and_parts(s3_server, s3_client, s3_bucket, tmp_path):
    data = os.urandom(6 * 1024 * 1024 + 5)
    s3_client.upload_fileobj(io.BytesIO(data), s3_bucket, "mp", Config=Boto3TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20))
    head = s3_client.head_object(Bucket=s3_bucket, Key="mp")
    etag = head["ETag"].strip('"')
    assert etag.endswith("-2")
    result = download(s3_client, s3_bucket, "mp", tmp_path / "mp", len(data), etag, TransferConfig(part_size=2**20, fsync=False))
    assert (tmp_path / "mp").read_bytes() == data
    assert result.verified == "size+parts"

    class WrongPartCount:
        """The object's part count disagrees with its ETag: the copy must not be kept."""

        def get_object(self, **kwargs):
            return s3_client.get_object(**kwargs)

        def head_object(self, **kwargs):
            assert kwargs["PartNumber"] == 1
            return {**s3_client.head_object(**kwargs), "PartsCount": 3}

    with pytest.raises(IncompleteDownload, match="3 parts"):
        download(WrongPartCount(), s3_bucket, "mp", tmp_path / "again", len(data), etag, FAST)
    assert not (tmp_path / "again").exists() and os.listdir(tmp_path) == ["mp"]


def test_size_mismatch_changed_and_missing(s3_client, s3_bucket, tmp_path):
    etag = put_bytes(s3_client, s3_bucket, "k", b"12345", "application/octet-stream")
    dest = tmp_path / "k"
    with pytest.raises(IncompleteDownload):
        download(s3_client, s3_bucket, "k", dest, 6, etag, FAST)
    with pytest.raises(IncompleteDownload):
        download(s3_client, s3_bucket, "k", dest, 4, etag, FAST)
    with pytest.raises(ObjectChanged):
        download(s3_client, s3_bucket, "k", dest, 5, "0" * 32, FAST)
    with pytest.raises(ModelNotFound):
        download(s3_client, s3_bucket, "absent", dest, 5, None, FAST)
    assert not dest.exists() and os.listdir(tmp_path) == []


def proxied_client(endpoint_url: str, *, read_timeout: float = 3, verify: str | None = None):
    """A client with no botocore retries of its own, so the transfer's retry budget is the only one."""
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION,
        verify=verify,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1, read_timeout=read_timeout),
    )


def resumed(proxy: DyingProxy, part_size: int) -> list[tuple[int, int]]:
    """The GETs that started inside a part: resumptions after a dropped stream."""
    return [r for r in proxy.ranges if r[0] % part_size]


@pytest.mark.parametrize("readers", [1, 2])
def test_reset_streams_resume_and_finished_ones_reuse_their_connection(s3_server, s3_client, s3_bucket, tmp_path, readers):
    data = os.urandom(3_000_000)
    etag = put_bytes(s3_client, s3_bucket, "k", data, "application/octet-stream")
    config = TransferConfig(concurrency=3, readers=readers, part_size=250_000, retries=3, backoff_base=0.01, fsync=False)
    with DyingProxy(s3_server.ports["s3"], faults={0: ("reset", 100_000), 2: ("reset", 30_000)}) as proxy:
        result = download(proxied_client(proxy.endpoint_url), s3_bucket, "k", tmp_path / "k", len(data), etag, config)
    assert (tmp_path / "k").read_bytes() == data
    assert (result.parts, result.retries, result.verified) == (12, 2, "md5")
    assert len(proxy.ranges) == 12 + 2 and len(resumed(proxy, 250_000)) == 2
    # A finished range hands its connection to the next one: 12 ranges over 3 streams need 3 connections,
    # and one more per reset (a part in flight holds one connection at most; only resets discard one).
    assert 3 <= proxy.connections <= 5


def test_a_stalled_stream_times_out_and_resumes(s3_server, s3_client, s3_bucket, tmp_path):
    data = os.urandom(1_000_000)
    etag = put_bytes(s3_client, s3_bucket, "k", data, "application/octet-stream")
    config = TransferConfig(concurrency=2, part_size=500_000, retries=2, backoff_base=0.01, fsync=False)
    with DyingProxy(s3_server.ports["s3"], faults={1: ("freeze", 60_000)}) as proxy:
        started = time.monotonic()
        result = download(proxied_client(proxy.endpoint_url, read_timeout=1), s3_bucket, "k", tmp_path / "k", len(data), etag, config)
        elapsed = time.monotonic() - started
    assert (tmp_path / "k").read_bytes() == data and result.retries == 1
    assert len(resumed(proxy, 500_000)) == 1
    assert 1 <= elapsed < 10  # the client's read timeout (1 s) applies to a silent stream, not 60 s or forever


def test_https_streams_are_read_the_same_way(s3_server, s3_client, s3_bucket, tmp_path):
    data = os.urandom(2_000_000)
    etag = put_bytes(s3_client, s3_bucket, "k", data, "application/octet-stream")
    context, ca_file = self_signed_tls(tmp_path)
    config = TransferConfig(concurrency=4, readers=2, part_size=200_000, retries=2, backoff_base=0.01, fsync=False)
    with DyingProxy(s3_server.ports["s3"], tls=context, faults={1: ("reset", 70_000)}) as proxy:
        client = proxied_client(proxy.endpoint_url, verify=ca_file)
        result = download(client, s3_bucket, "k", tmp_path / "d" / "k", len(data), etag, config)
    assert (tmp_path / "d" / "k").read_bytes() == data
    assert (result.parts, result.retries, result.verified) == (10, 1, "md5")
    assert len(resumed(proxy, 200_000)) == 1
    # TLS connections go back to the pool too: 4 streams + 1 reset, where closing each would take 11.
    assert 4 <= proxy.connections <= 5


def test_server_dying_midway_gives_bounded_retries_then_a_clear_failure(s3_server, s3_client, s3_bucket, tmp_path):
    data = os.urandom(2_000_000)
    etag = put_bytes(s3_client, s3_bucket, "models/Stable-diffusion/dying.safetensors", data, "application/octet-stream")
    dest = tmp_path / "cache" / "dying.safetensors"
    config = TransferConfig(concurrency=4, part_size=250_000, retries=3, backoff_base=0.05, fsync=False)
    with DyingProxy(s3_server.ports["s3"], cut_after=600_000) as proxy:
        client = proxied_client(proxy.endpoint_url)
        started = time.monotonic()
        with pytest.raises(TransferFailed) as info:
            download(client, s3_bucket, "models/Stable-diffusion/dying.safetensors", dest, len(data), etag, config)
        elapsed = time.monotonic() - started
    message = info.value.message
    assert "dying.safetensors" in message and "gave up after 4 attempts" in message
    assert elapsed < 8  # bounded: 3 retries with ≤ 0.4 s backoff, refused connections fail fast
    assert proxy.dead.is_set() and proxy.requests <= 8  # the GETs before the crash; none reach a dead server
    assert os.listdir(dest.parent) == []  # neither the final file nor a temp file


def test_transient_classification():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(status, code):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(ConnectionResetError())
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(client_error(503, "SlowDown")) and is_transient(client_error(500, "InternalError"))
    assert not is_transient(client_error(403, "AccessDenied")) and not is_transient(client_error(404, "NoSuchKey"))
    assert not is_transient(OSError(28, "No space left on device"))
    assert is_transient(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"))  # a TLS stream cut midway
    assert not is_transient(ssl.SSLCertVerificationError(1, "certificate verify failed"))


def test_kms_encrypted_objects_skip_the_md5_their_etag_is_not(s3_client, s3_bucket, tmp_path):
    data = os.urandom(250_000)
    etag = put_bytes(s3_client, s3_bucket, "k", data, "application/octet-stream")
    # On AWS an SSE-KMS object's ETag is not the MD5 of its bytes: comparing would fail every download.
    kms = FlakyClient(s3_client, sse="aws:kms")
    result = download(kms, s3_bucket, "k", tmp_path / "k", len(data), etag, FAST)
    assert result.verified == "size" and (tmp_path / "k").read_bytes() == data


def test_bodies_the_pump_cannot_read_directly_are_read_by_their_opener(s3_client, s3_bucket):
    put_bytes(s3_client, s3_bucket, "k", b"x" * 1000, "application/octet-stream")
    response = s3_client.get_object(Bucket=s3_bucket, Key="k")
    assert SocketBody.of(response["Body"], response) is not None
    assert SocketBody.of(response["Body"], {**response, "ContentEncoding": "gzip"}) is None  # bytes would need decoding
    assert SocketBody.of(_Body(response["Body"]), response) is None  # not botocore's body (the tests' fault injectors)
    response["Body"].close()


def test_a_full_disk_fails_the_download_at_once_and_leaves_nothing(s3_client, s3_bucket, tmp_path, monkeypatch):
    data = os.urandom(2_000_000)
    etag = put_bytes(s3_client, s3_bucket, "k", data, "application/octet-stream")
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, buffer, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, buffer, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    config = TransferConfig(concurrency=4, readers=2, part_size=250_000, retries=3, backoff_base=0.01, fsync=False)
    with pytest.raises(OSError) as info:
        download(s3_client, s3_bucket, "k", tmp_path / "d" / "k", len(data), etag, config)
    assert info.value.errno == errno.ENOSPC  # not retried: no amount of retrying makes room
    assert os.listdir(tmp_path / "d") == []


def test_the_file_is_preallocated_and_a_size_beyond_the_free_space_fails_before_any_get(s3_client, s3_bucket, tmp_path, monkeypatch):
    data = os.urandom(300_000)
    etag = put_bytes(s3_client, s3_bucket, "k", data, "application/octet-stream")
    fd = os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT)
    try:
        transfer._presize(fd, 1_000_000)
        allocated = os.fstat(fd).st_blocks * 512
        assert os.fstat(fd).st_size == 1_000_000
        assert allocated >= 1_000_000 or transfer._fallocate(fd, 1) != 0  # reserved, where the filesystem can
    finally:
        os.close(fd)

    class Tiny:  # what fstatvfs reports for a nearly full disk: 10 blocks free
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(os, "fstatvfs", lambda fd: Tiny)
    flaky = FlakyClient(s3_client)
    with pytest.raises(OSError) as info:
        download(flaky, s3_bucket, "k", tmp_path / "d" / "k", len(data), etag, FAST)
    assert info.value.errno == errno.ENOSPC and "300000 bytes" in str(info.value)
    assert flaky.ranges == [] and os.listdir(tmp_path / "d") == []  # nothing fetched, nothing left


def test_a_failed_preallocation_gives_its_blocks_back(tmp_path, monkeypatch):
    real = transfer._fallocate

    def partial(fd, size):  # another writer took the space meanwhile: part allocated, then ENOSPC
        real(fd, size // 2)
        return errno.ENOSPC

    monkeypatch.setattr(transfer, "_fallocate", partial)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError) as info:
            transfer._presize(fd, 4_000_000)
        assert info.value.errno == errno.ENOSPC
        assert os.fstat(fd).st_blocks == 0 and os.fstat(fd).st_size == 0
    finally:
        os.close(fd)


def test_without_fallocate_the_file_is_sparse_and_the_download_still_works(s3_client, s3_bucket, tmp_path, monkeypatch):
    data = os.urandom(500_000)
    etag = put_bytes(s3_client, s3_bucket, "k", data, "application/octet-stream")
    monkeypatch.setattr(transfer, "_fallocate", lambda fd, size: errno.EOPNOTSUPP)
    download(s3_client, s3_bucket, "k", tmp_path / "k", len(data), etag, FAST)
    assert (tmp_path / "k").read_bytes() == data
