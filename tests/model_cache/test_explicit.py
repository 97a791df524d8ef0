"""The envelope's explicit model locations: validated before any I/O, visible to one job's thread only."""

from __future__ import annotations

import threading

import pytest

from model_cache.access import S3AllowList
from model_cache.explicit import MAX_PER_KIND, parse_models
from model_cache.store import LocalStore
from pipelines.errors import Forbidden, InvalidParameter, ModelNotFound
from tests.model_cache.helpers import safetensors_bytes as st
from tests.model_cache.test_s3_tier import tier  # noqa: F401 - fixture

ALLOW = S3AllowList(["s3://bkt/models/", "s3://bkt/team/"])


def test_parse_and_match():
    models = parse_models({"Stable-diffusion": ["s3://bkt/team/a/x.v2.safetensors"], "Lora": "s3://bkt/models/Lora/ink.pt"}, allow=ALLOW)
    assert models.default_checkpoint() == "x.v2.safetensors"
    assert models.match("Stable-diffusion", "x.v2").uri == "s3://bkt/team/a/x.v2.safetensors"
    assert models.match("Stable-diffusion", "sub/x.v2.safetensors") is not None
    assert models.match("Lora", "INK").field == "models.Lora[0]"
    assert models.match("Lora", "x.v2") is None and models.match("VAE", "ink") is None
    assert models.as_dict() == {"Stable-diffusion": ["s3://bkt/team/a/x.v2.safetensors"], "Lora": ["s3://bkt/models/Lora/ink.pt"]}
    assert not parse_models(None, allow=None) and not parse_models({}, allow=ALLOW)


@pytest.mark.parametrize("value, error, field", [
    ({"Checkpoints": ["s3://bkt/team/x.safetensors"]}, InvalidParameter, "models.Checkpoints"),
    ({"Lora": [3]}, InvalidParameter, "models.Lora"),
    ({"Lora": ["s3://bkt/private/x.safetensors"]}, Forbidden, "models.Lora[0]"),
    ({"Lora": ["s3://bkt/team/ok.safetensors", "s3://bkt/team/../private/x.safetensors"]}, InvalidParameter, "models.Lora[1]"),
    ({"Lora": ["s3://bkt/team/a%2fx.safetensors"]}, InvalidParameter, "models.Lora[0]"),
    ({"Lora": ["s3://bkt/team/notes.txt"]}, InvalidParameter, "models.Lora[0]"),
    ({"Lora": ["s3://bkt/team/x:y.safetensors"]}, InvalidParameter, "models.Lora[0]"),
    ({"Lora": ["s3://bkt/team/folder/"]}, InvalidParameter, "models.Lora[0]"),
    ({"Lora": [f"s3://bkt/team/{i}.pt" for i in range(MAX_PER_KIND + 1)]}, InvalidParameter, "models.Lora"),
    ("s3://bkt/team/x.safetensors", InvalidParameter, "models"),
])
def test_bad_locations_are_refused_naming_the_entry(value, error, field):
    with pytest.raises(error) as info:
        parse_models(value, allow=ALLOW)
    assert info.value.field == field


def test_a_local_store_cannot_take_s3_locations(tmp_path):
    with pytest.raises(Forbidden) as info:
        parse_models({"VAE": ["s3://bkt/team/v.safetensors"]}, allow=None)
    assert "MODEL_STORE on S3" in info.value.message and info.value.field == "models.VAE[0]"
    store = LocalStore(tmp_path)
    with pytest.raises(Forbidden):
        with store.explicit(parse_models({"VAE": ["s3://bkt/team/v.safetensors"]}, allow=ALLOW)):
            pass
    with store.explicit(parse_models(None, allow=None)):
        pass


def test_store_overlay_is_per_job_and_per_thread(tier, s3_client):  # noqa: F811
    data = st(b"team lora")
    s3_client.put_object(Bucket=tier.bucket, Key="team/loras/ink.safetensors", Body=data)
    tier.put("Lora", "own.safetensors", st(b"own"))
    store = tier.store(allowed_prefixes=[f"s3://{tier.bucket}/team/"])
    models = parse_models({"Lora": [f"s3://{tier.bucket}/team/loras/ink.safetensors"]},
                          allow=S3AllowList([f"s3://{tier.bucket}/models/", f"s3://{tier.bucket}/team/"]))
    seen_elsewhere = []
    with store.explicit(models):
        ref = store.resolve("Lora", "ink")
        assert ref.location == f"s3://{tier.bucket}/team/loras/ink.safetensors" and ref.size == len(data)
        assert store.fetch(ref).read_bytes() == data
        assert [r.name for r in store.list("Lora")] == ["ink.safetensors", "own.safetensors"]
        other = threading.Thread(target=lambda: seen_elsewhere.append([r.name for r in store.list("Lora")]))
        other.start()
        other.join()
    assert seen_elsewhere == [["own.safetensors"]]  # another thread (another job) does not see them
    with pytest.raises(ModelNotFound):
        store.resolve("Lora", "ink")
