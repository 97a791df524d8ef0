"""The S3 metadata memo: a warm job asks S3 nothing; new names are found at once; changes show after the TTL."""

from __future__ import annotations

import pytest

from model_cache.memo import MAX_ENTRIES, MetadataMemo
from pipelines.errors import ModelNotFound
from tests.model_cache.helpers import safetensors_bytes as st
from tests.model_cache.test_s3_tier import tier  # noqa: F401 - fixture


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_answers_are_reused_for_the_ttl_and_failures_never():
    clock, calls = Clock(), []
    memo = MetadataMemo(10, clock=clock)

    def answer(value):
        return lambda: calls.append(value) or value

    assert memo.get("k", answer(1)) == 1 and memo.get("k", answer(2)) == 1
    clock.now += 10
    assert memo.get("k", answer(3)) == 3 and calls == [1, 3]

    def missing():
        calls.append("miss")
        raise ModelNotFound("nope")

    for _ in range(2):
        with pytest.raises(ModelNotFound):
            memo.get("m", missing)
    assert calls.count("miss") == 2
    assert MetadataMemo(0).get("k", answer(4)) == 4 and MetadataMemo(0).get("k", answer(5)) == 5
    for i in range(MAX_ENTRIES + 5):
        memo.get(("many", i), lambda: 0)
    assert memo.stats()["entries"] <= MAX_ENTRIES


def warm_job(store):
    """What a job asks the store: the checkpoint (resolve + fetch with sidecars), the embeddings and VAE listings."""
    with store.job_scope():
        path = store.fetch(store.resolve("Stable-diffusion", "ckpt"))
        store.list("embeddings")
        store.list("VAE")
    return path


def test_a_warm_job_makes_no_s3_request(tier):  # noqa: F811
    tier.put("Stable-diffusion", "ckpt.safetensors", st(b"v1"))
    tier.put("Stable-diffusion", "ckpt.config/model_index.json", b"{}")
    tier.put("embeddings", "e.safetensors", st(b"e"))
    uncached, memoized = tier.store(), tier.store(metadata_ttl=30)
    warm_job(uncached)
    tier.client.calls.clear()
    warm_job(uncached)
    asked_every_time = len(tier.client.calls)
    warm_job(memoized)
    tier.client.calls.clear()
    assert warm_job(memoized).read_bytes() == st(b"v1")
    assert asked_every_time >= 4 and tier.client.calls == []
    assert memoized.cache_stats()["metadata"]["hits"] >= 4


def test_new_names_at_once_changes_after_the_ttl(tier):  # noqa: F811
    tier.put("Stable-diffusion", "ckpt.safetensors", st(b"v1"))
    store = tier.store(metadata_ttl=30)
    clock = Clock()
    store.memo = MetadataMemo(30, clock=clock)
    assert warm_job(store).read_bytes() == st(b"v1")
    with pytest.raises(ModelNotFound):
        store.resolve("Lora", "fresh")
    tier.put("Lora", "fresh.safetensors", st(b"fresh"))
    assert store.resolve("Lora", "fresh").name == "fresh.safetensors"  # a miss is never remembered
    tier.put("Stable-diffusion", "ckpt.safetensors", st(b"v2 with more bytes"))
    assert warm_job(store).read_bytes() == st(b"v1")  # within the TTL: the version we resolved
    clock.now += 30
    assert warm_job(store).read_bytes() == st(b"v2 with more bytes")


def test_a_deleted_object_clears_the_memo(tier, s3_client):  # noqa: F811
    tier.put("Lora", "gone.safetensors", st(b"gone"))
    store = tier.store(metadata_ttl=30)
    ref = store.resolve("Lora", "gone")
    s3_client.delete_object(Bucket=tier.bucket, Key="models/Lora/gone.safetensors")
    with pytest.raises(ModelNotFound):
        store.fetch(ref)
    with pytest.raises(ModelNotFound):
        store.resolve("Lora", "gone")  # asked again, not answered from memory


def test_fresh_listing_sees_what_was_uploaded_within_the_ttl(tier):  # noqa: F811
    """What the worker does when a named VAE is not in a remembered listing: list once more, remember that."""
    from pipelines.vae import choose_vae

    store = tier.store(metadata_ttl=30)
    assert store.list("VAE") == []
    tier.put("VAE", "new.vae.safetensors", st(b"vae"))
    with pytest.raises(ModelNotFound):
        choose_vae("new.vae.safetensors", "ckpt", [r.name for r in store.list("VAE")])
    assert choose_vae("new.vae.safetensors", "ckpt", [r.name for r in store.list("VAE", fresh=True)]) == "new.vae.safetensors"
    tier.client.calls.clear()
    assert [r.name for r in store.list("VAE")] == ["new.vae.safetensors"] and tier.client.calls == []
