"""The S3 store through its disk tier, against a real SeaweedFS: faults, fences, budgets, restarts."""

import os
import threading
import time

import pytest

from model_cache.disk import DiskCache
from model_cache.refs import ModelRef
from model_cache.s3_store import S3Store
from model_cache.store import LocalStore, list_all
from model_cache.transfer import TransferConfig, TransferFailed
from pipelines.errors import (
    Forbidden,
    InsufficientStorage,
    InvalidParameter,
    ModelRejected,
)
from tests.model_cache.helpers import safetensors_bytes as st
from tests.model_cache.proxy import DyingProxy
from tests.model_cache.test_store import CountingClient
from tests.model_cache.test_transfer import proxied_client

FAST = TransferConfig(concurrency=4, part_size=64 * 1024, retries=2, backoff_base=0.01, fsync=False)


@pytest.fixture
def tier(s3_client, s3_bucket, tmp_path):
    """Puts objects under ``s3://<bucket>/models/`` and opens stores over one cache folder."""

    class Tier:
        bucket = s3_bucket
        cache_dir = tmp_path / "cache"
        client = CountingClient(s3_client)

        def put(self, kind, name, data):
            s3_client.put_object(Bucket=s3_bucket, Key=f"models/{kind}/{name}", Body=data)

        def store(self, budget=10**9, client=None, **kwargs) -> S3Store:
            disk = DiskCache(self.cache_dir, budget=budget, min_free=0)
            return S3Store(f"s3://{s3_bucket}/models/", client or self.client, self.cache_dir, disk=disk, transfer=FAST, **kwargs)

        def files(self):
            return sorted(p.relative_to(self.cache_dir).as_posix() for p in self.cache_dir.rglob("*") if p.is_file())

    return Tier()


def model_files(tier):
    """Cached files other than the tier's own index."""
    return [f for f in tier.files() if f != ".meta/lru.json"]


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda good: good[: len(good) - 10], "data bytes"),  # truncated
        (lambda good: (10**6).to_bytes(8, "little") + good[8:], "beyond the file size"),  # header length past the end
        (lambda good: good[:8] + b"{not json" + good[17:], "not JSON"),  # bad header
        (lambda good: b"\x00" * len(good), "header"),  # not a safetensors file at all
    ],
)
def test_corrupt_safetensors_is_rejected_naming_the_file_and_removed(tier, damage, why):
    tier.put("Stable-diffusion", "broken.safetensors", damage(st(os.urandom(5000))))
    store = tier.store()
    with pytest.raises(ModelRejected) as info:
        store.fetch(store.resolve("Stable-diffusion", "broken"))
    assert "broken.safetensors" in info.value.message and "corrupt or truncated" in info.value.message
    assert why in info.value.message
    assert model_files(tier) == []  # no data file, no etag record, no temp file
    assert store.cache_snapshot() == []


def test_a_cached_copy_damaged_on_disk_is_replaced(tier):
    good = st(os.urandom(5000))
    tier.put("Lora", "l.safetensors", good)
    store = tier.store()
    path = store.fetch(store.resolve("Lora", "l"))
    with open(path, "r+b") as handle:  # same size, broken header: only the structural check sees it
        handle.write(b"\xff" * 8)
    assert store.fetch(store.resolve("Lora", "l")).read_bytes() == good
    assert tier.client.gets() == 2


def test_local_corrupt_file_is_rejected_but_never_deleted(tmp_path):
    root = tmp_path / "models" / "Stable-diffusion"
    root.mkdir(parents=True)
    (root / "half.safetensors").write_bytes(st(b"x" * 100)[:-7])
    store = LocalStore(tmp_path / "models")
    with pytest.raises(ModelRejected, match="half.safetensors"):
        store.fetch(store.resolve("Stable-diffusion", "half"))
    assert (root / "half.safetensors").exists()


@pytest.mark.parametrize(
    "uri, error",
    [
        ("s3://other-bucket/models/Lora/x.safetensors", Forbidden),
        ("s3://{bucket}/private/Lora/x.safetensors", Forbidden),
        ("s3://{bucket}/models-private/Lora/x.safetensors", Forbidden),  # a prefix matches whole segments
        ("s3://{bucket}/models/Lora/../../private/x.safetensors", InvalidParameter),
        ("s3://{bucket}/models/Lora/a%2f..%2fx.safetensors", InvalidParameter),
        ("s3://{bucket}/models/Lora/a%252Fx.safetensors", InvalidParameter),
        ("s3://{bucket}/models/Lora/a%5cx.safetensors", InvalidParameter),
        ("s3://{bucket}/models/Lora/a\\x.safetensors", InvalidParameter),
        ("/etc/passwd", InvalidParameter),
        ("file:///etc/passwd", InvalidParameter),
    ],
)
def test_locations_outside_the_allow_list_are_refused_before_any_io(tier, uri, error):
    uri = uri.format(bucket=tier.bucket)
    store = tier.store()
    with pytest.raises(error) as info:
        store.resolve_uri("Lora", uri, field="models.Lora")
    assert info.value.field == "models.Lora"
    if error is Forbidden:
        assert "outside the allowed model locations" in info.value.message and uri in info.value.message
    with pytest.raises((Forbidden, InvalidParameter)):
        store.fetch(ModelRef("Lora", "x.safetensors", uri, 10, 0.0, "0" * 32))
    assert tier.client.calls == []  # not one S3 request
    assert model_files(tier) == []


def test_allowed_extra_prefix_is_fetched(tier, s3_client):
    data = st(b"shared lora")
    s3_client.put_object(Bucket=tier.bucket, Key="shared/loras/s.safetensors", Body=data)
    store = tier.store(allowed_prefixes=[f"s3://{tier.bucket}/shared/"])
    ref = store.resolve_uri("Lora", f"s3://{tier.bucket}/shared/loras/s.safetensors")
    assert (ref.name, ref.size) == ("s.safetensors", len(data))
    assert store.fetch(ref).read_bytes() == data


def test_budget_too_small_fails_clearly_and_keeps_what_is_in_use(tier):
    tier.put("Stable-diffusion", "a.safetensors", st(b"a" * 3000))
    tier.put("Stable-diffusion", "big.safetensors", st(b"b" * 9000))
    store = tier.store(budget=8000)
    with store.job_scope():
        in_use = store.fetch(store.resolve("Stable-diffusion", "a"))
        gets = tier.client.gets()
        with pytest.raises(InsufficientStorage) as info:
            store.fetch(store.resolve("Stable-diffusion", "big"))
        assert "big.safetensors" in info.value.message and "7.8 KiB" in info.value.message  # the budget
        assert tier.client.gets() == gets  # refused before downloading anything
        assert in_use.exists() and [r["pinned"] for r in store.cache_snapshot()] == [True]
    assert [r["pinned"] for r in store.cache_snapshot()] == [False]


def test_concurrent_requests_for_one_uncached_model_make_one_transfer(tier, s3_server):
    data = st(os.urandom(300 * 1024))
    tier.put("Stable-diffusion", "shared.safetensors", data)
    client = s3_server.client()
    gets: list[str] = []
    # Count at the botocore level: every GetObject the process sends, whoever sends it.
    client.meta.events.register("before-call.s3.GetObject", lambda params, **_: gets.append(params.get("Range", "")))
    store = tier.store(client=client)
    ref = store.resolve("Stable-diffusion", "shared")
    barrier, results, errors = threading.Barrier(8), [], []

    def request():
        barrier.wait()
        try:
            results.append(store.fetch(ref))
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == 8 and len(set(results)) == 1
    assert len(gets) == 5  # one transfer: ceil(300 KiB + header / 64 KiB) ranged GETs, no more
    assert results[0].read_bytes() == data
    assert store.cache_stats()["misses"] == 1 and store.cache_stats()["hits"] == 7


def test_lru_and_stats_survive_a_restart(tier):
    for name in ("one", "two", "three"):
        tier.put("Lora", f"{name}.safetensors", st(name.encode() * 100))
    store = tier.store()
    for name in ("one", "two", "three", "one"):
        store.fetch(store.resolve("Lora", name))
        time.sleep(0.01)
    order = [row["name"].rsplit("/", 1)[-1] for row in store.cache_snapshot()]
    assert order == ["one.safetensors", "three.safetensors", "two.safetensors"]
    store.wait_durable()
    assert all(row["durable"] for row in store.cache_snapshot())
    again = tier.store()  # a new worker on the same cache folder
    assert [row["name"].rsplit("/", 1)[-1] for row in again.cache_snapshot()] == order
    gets = tier.client.gets()
    again.fetch(again.resolve("Lora", "two"))
    assert tier.client.gets() == gets  # still cached: no download
    (tier.cache_dir / ".meta" / "lru.json").unlink()  # index lost: files on disk are adopted, not forgotten
    assert len(tier.store().cache_snapshot()) == 3


def test_server_dying_mid_download_leaves_nothing_that_looks_cached(tier, s3_server):
    data = st(os.urandom(1_000_000))
    tier.put("Stable-diffusion", "dying.safetensors", data)
    with DyingProxy(s3_server.ports["s3"], cut_after=300_000) as proxy:
        store = tier.store(client=proxied_client(proxy.endpoint_url))
        ref = store.resolve("Stable-diffusion", "dying")  # HEAD through the proxy, still alive
        with pytest.raises(TransferFailed, match="dying.safetensors"):
            store.fetch(ref)
    assert model_files(tier) == [] and store.cache_snapshot() == []
    healthy = tier.store()
    assert healthy.fetch(ref).read_bytes() == data


def test_list_all_kinds_with_size_and_last_modified(tier):
    tier.put("Stable-diffusion", "sd.safetensors", b"s" * 11)
    tier.put("VAE", "sub/v.safetensors", b"v" * 7)
    listing = list_all(tier.store())
    assert set(listing) == {"Stable-diffusion", "Lora", "hypernetworks", "embeddings", "VAE", "ControlNet", "annotators"}
    assert [(r.name, r.size) for r in listing["VAE"]] == [("sub/v.safetensors", 7)]
    assert all(abs(r.modified - time.time()) < 120 for refs in listing.values() for r in refs)


def test_sidecars_travel_with_their_checkpoint_and_are_evicted_with_it(tier, s3_client):
    tier.put("Stable-diffusion", "cp.safetensors", st(b"c" * 4000))
    tier.put("Stable-diffusion", "cp.yaml", b"model: v1\n")
    tier.put("Stable-diffusion", "cp.config/model_index.json", b"{}")
    tier.put("Stable-diffusion", "other.safetensors", st(b"o" * 4000))
    store = tier.store(budget=6000)
    path = store.fetch(store.resolve("Stable-diffusion", "cp"))
    assert (path.parent / "cp.yaml").read_bytes() == b"model: v1\n"
    assert (path.parent / "cp.config" / "model_index.json").read_bytes() == b"{}"
    tier.put("Stable-diffusion", "cp.yaml", b"model: v2\n")  # the config changed, the weights did not
    store.fetch(store.resolve("Stable-diffusion", "cp"))
    assert (path.parent / "cp.yaml").read_bytes() == b"model: v2\n"
    assert store.cache_snapshot()[0]["bytes"] == len(st(b"c" * 4000)) + len(b"model: v2\n") + 2
    store.fetch(store.resolve("Stable-diffusion", "other"))  # no room for both: cp goes, with its sidecars
    leftovers = [f for f in model_files(tier) if "/cp." in f]
    assert leftovers == [] and not (path.parent / "cp.config").exists()


def test_a_download_not_yet_synced_when_the_machine_went_down_is_fetched_again(tier):
    data = st(b"w" * 3000)
    tier.put("Lora", "w.safetensors", data)
    store = tier.store()
    store._syncer.submit(time.sleep, 0.5)  # hold the background fsync back: the "crash" comes first
    path = store.fetch(store.resolve("Lora", "w"))
    assert [row["durable"] for row in store.cache_snapshot()] == [False]
    again = tier.store()  # restart while the entry is still marked not durable
    assert again.cache_snapshot() == [] and not path.exists()
    gets = tier.client.gets()
    assert again.fetch(again.resolve("Lora", "w")).read_bytes() == data
    assert tier.client.gets() == gets + 1
