"""`sdctl models list|upload` against SeaweedFS: multipart upload with sha256 metadata, refuse/force, names validated."""

from __future__ import annotations

import hashlib
import os

import pytest

from client import models as client_models
from client.config import Clients


@pytest.fixture
def store(s3_client, s3_bucket):
    return {"uri": f"s3://{s3_bucket}/models/", "bucket": s3_bucket, "clients": Clients(s3_factory=lambda: s3_client)}


def test_upload_then_list_then_same_content(sdctl, store, s3_client, tmp_path):
    model = tmp_path / "style.safetensors"
    model.write_bytes(b"lora bytes" * 100)
    result = sdctl("--models", store["uri"], "models", "upload", model, "--type", "Lora", "--name", "styles/style.safetensors", clients=store["clients"])
    assert result.exit_code == 0, result.output
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    head = s3_client.head_object(Bucket=store["bucket"], Key="models/Lora/styles/style.safetensors")
    assert head["Metadata"]["sha256"] == sha and head["ContentLength"] == 1000
    result = sdctl("--models", store["uri"], "models", "list", "--type", "Lora", clients=store["clients"])
    assert result.exit_code == 0 and result.stdout.splitlines() == ["Lora/styles/style.safetensors\t1000"]
    result = sdctl("--models", store["uri"], "models", "upload", model, "--type", "Lora", "--name", "styles/style.safetensors", clients=store["clients"])
    assert result.exit_code == 0 and "already there" in result.stdout


def test_refuses_different_content_unless_force(sdctl, store, s3_client, tmp_path):
    a, b = tmp_path / "a" / "m.safetensors", tmp_path / "b" / "m.safetensors"
    for path, body in ((a, b"one"), (b, b"two")):
        path.parent.mkdir()
        path.write_bytes(body)
    assert sdctl("--models", store["uri"], "models", "upload", a, "--type", "VAE", clients=store["clients"]).exit_code == 0
    result = sdctl("--models", store["uri"], "models", "upload", b, "--type", "VAE", clients=store["clients"])
    assert result.exit_code == 2 and "--force" in result.output
    assert s3_client.get_object(Bucket=store["bucket"], Key="models/VAE/m.safetensors")["Body"].read() == b"one"
    result = sdctl("--models", store["uri"], "models", "upload", b, "--type", "VAE", "--force", clients=store["clients"])
    assert result.exit_code == 0, result.output
    assert s3_client.get_object(Bucket=store["bucket"], Key="models/VAE/m.safetensors")["Body"].read() == b"two"


def test_multipart_upload(sdctl, store, s3_client, tmp_path, monkeypatch):
    monkeypatch.setattr(client_models, "MULTIPART_CHUNK", 5 * 1024 * 1024)
    big = tmp_path / "big.safetensors"
    big.write_bytes(os.urandom(11 * 1024 * 1024))
    result = sdctl("--models", store["uri"], "models", "upload", big, "--type", "Stable-diffusion", clients=store["clients"])
    assert result.exit_code == 0, result.output
    head = s3_client.head_object(Bucket=store["bucket"], Key="models/Stable-diffusion/big.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert head["Metadata"]["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()


@pytest.mark.parametrize("args", [
    ["--type", "Loras"],
    ["--type", "Lora", "--name", "../escape.safetensors"],
    ["--type", "Lora", "--name", "x.txt"],
    ["--type", "Lora", "--name", "a%2fb.safetensors"],
])
def test_bad_names_and_kinds_are_refused_before_io(sdctl, store, s3_client, tmp_path, args):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    result = sdctl("--models", store["uri"], "models", "upload", model, *args, clients=store["clients"])
    assert result.exit_code == 2, result.output
    assert s3_client.list_objects_v2(Bucket=store["bucket"]).get("KeyCount", 0) == 0


def test_local_store_and_errors(sdctl, tmp_path, s3_client):
    model = tmp_path / "e.pt"
    model.write_bytes(b"emb")
    root = tmp_path / "store"
    assert sdctl("--models", root, "models", "upload", model, "--type", "embeddings").exit_code == 0
    assert (root / "embeddings" / "e.pt").read_bytes() == b"emb"
    assert sdctl("--models", root, "models", "list").stdout.splitlines() == ["embeddings/e.pt\t3"]
    assert sdctl("models", "list").exit_code == 2  # no store given
    assert sdctl("--models", root, "models", "upload", tmp_path / "missing.pt", "--type", "embeddings").exit_code == 2
    missing = sdctl("--models", "s3://no-such-bucket-sdctl/m/", "models", "list", clients=Clients(s3_factory=lambda: s3_client))
    assert missing.exit_code == 5 and "bucket" in missing.output
