"""Resumable model uploads against SeaweedFS: interrupt after k parts, re-run, only the missing parts are sent."""

from __future__ import annotations

import hashlib
import os

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from client import models as client_models
from client import upload as client_upload
from client.config import Clients
from client.upload import MAX_PARTS, StateFile, part_size_for, parts_of
from tests.client.conftest import CountingClient

MIB = 1024 * 1024
PART = 5 * MIB  # S3's smallest part


class FailingClient(CountingClient):
    """Counts calls; the (k+1)-th UploadPart fails as a dropped connection would."""

    def __init__(self, inner, fail_after: int):
        super().__init__(inner)
        self.fail_after = fail_after

    def __getattr__(self, name):
        call = super().__getattr__(name)
        if name != "upload_part":
            return call

        def upload_part(**kwargs):
            if self.calls["upload_part"] >= self.fail_after:
                self.calls["upload_part"] += 1
                raise EndpointConnectionError(endpoint_url="http://s3.test")
            return call(**kwargs)

        return upload_part


@pytest.fixture
def setup(s3_client, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(client_models, "MULTIPART_CHUNK", PART)
    monkeypatch.setattr(client_upload, "CONCURRENCY", 1)  # parts go in order: "interrupted after k" is exact
    model = tmp_path / "big.safetensors"
    model.write_bytes(os.urandom(3 * PART + 2 * MIB))  # 4 parts, the last one short
    return {"uri": f"s3://{s3_bucket}/models/", "bucket": s3_bucket, "key": "models/Stable-diffusion/big.safetensors",
            "model": model}


def run(sdctl, setup, client):
    return sdctl("--models", setup["uri"], "models", "upload", setup["model"], "--type", "Stable-diffusion",
                 clients=Clients(s3_factory=lambda: client))


def interrupted(sdctl, setup, s3_client, k: int) -> StateFile:
    failing = FailingClient(s3_client, fail_after=k)
    result = run(sdctl, setup, failing)
    assert result.exit_code == 5, result.output
    assert f"{k} of 4 parts" in result.output and "run the same command again to resume" in result.output
    state = StateFile(setup["bucket"], setup["key"])
    assert state.read() is not None
    with pytest.raises(ClientError):
        s3_client.head_object(Bucket=setup["bucket"], Key=setup["key"])  # nothing visible yet
    return state


def assert_uploaded(s3_client, setup):
    body = s3_client.get_object(Bucket=setup["bucket"], Key=setup["key"])
    data = setup["model"].read_bytes()
    assert body["Body"].read() == data
    assert body["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["ETag"].strip('"').endswith("-4")


def test_rerun_sends_only_the_missing_parts(sdctl, setup, s3_client):
    state = interrupted(sdctl, setup, s3_client, k=2)
    upload_id = state.read().upload_id
    assert len(s3_client.list_parts(Bucket=setup["bucket"], Key=setup["key"], UploadId=upload_id)["Parts"]) == 2
    counting = CountingClient(s3_client)
    result = run(sdctl, setup, counting)
    assert result.exit_code == 0, result.output
    assert "resuming: 2 of 4 parts (10.0 MiB) already uploaded and verified" in result.output
    assert counting.calls["upload_part"] == 2 and counting.calls["create_multipart_upload"] == 0
    assert counting.calls["complete_multipart_upload"] == 1
    assert_uploaded(s3_client, setup)
    assert state.read() is None  # done: forgotten


class CorruptingClient(FailingClient):
    """Like :class:`FailingClient`, and part 2 reaches S3 with other bytes (no Content-MD5 to catch it)."""

    def __getattr__(self, name):
        call = super().__getattr__(name)
        if name != "upload_part":
            return call

        def upload_part(**kwargs):
            if kwargs["PartNumber"] == 2:
                kwargs = {**kwargs, "Body": b"x" * len(kwargs["Body"])}
                kwargs.pop("ContentMD5", None)
            return call(**kwargs)

        return upload_part


def test_a_corrupted_part_in_s3_is_sent_again(sdctl, setup, s3_client):
    result = run(sdctl, setup, CorruptingClient(s3_client, fail_after=3))
    assert result.exit_code == 5 and "3 of 4 parts" in result.output
    counting = CountingClient(s3_client)
    result = run(sdctl, setup, counting)
    assert result.exit_code == 0, result.output
    assert "resuming: 2 of 4 parts" in result.output  # parts 1 and 3; part 2's ETag is not the local MD5
    assert counting.calls["upload_part"] == 2  # part 2 again, and part 4
    assert_uploaded(s3_client, setup)


def test_a_changed_file_starts_over_and_aborts_the_old_upload(sdctl, setup, s3_client):
    state = interrupted(sdctl, setup, s3_client, k=2)
    old_id = state.read().upload_id
    data = bytearray(setup["model"].read_bytes())
    data[0] ^= 0xFF  # same size, other content: the sha256 differs
    setup["model"].write_bytes(bytes(data))
    counting = CountingClient(s3_client)
    result = run(sdctl, setup, counting)
    assert result.exit_code == 0, result.output
    assert "the local file changed" in result.output
    assert counting.calls["abort_multipart_upload"] == 1 and counting.calls["create_multipart_upload"] == 1
    assert counting.calls["upload_part"] == 4
    assert_uploaded(s3_client, setup)
    uploads = s3_client.list_multipart_uploads(Bucket=setup["bucket"]).get("Uploads", [])
    assert old_id not in [u["UploadId"] for u in uploads]


def test_an_upload_gone_from_s3_starts_over(sdctl, setup, s3_client):
    state = interrupted(sdctl, setup, s3_client, k=1)
    s3_client.abort_multipart_upload(Bucket=setup["bucket"], Key=setup["key"], UploadId=state.read().upload_id)
    counting = CountingClient(s3_client)
    result = run(sdctl, setup, counting)
    assert result.exit_code == 0, result.output
    assert "gone from S3" in result.output and counting.calls["upload_part"] == 4
    assert_uploaded(s3_client, setup)


def test_same_content_already_there_forgets_a_leftover_upload(sdctl, setup, s3_client):
    state = interrupted(sdctl, setup, s3_client, k=1)
    upload_id = state.read().upload_id
    data = setup["model"].read_bytes()
    # meanwhile the same file arrived by another way (a colleague, another machine)
    s3_client.put_object(Bucket=setup["bucket"], Key=setup["key"], Body=data,
                         Metadata={"sha256": hashlib.sha256(data).hexdigest()})
    counting = CountingClient(s3_client)
    result = run(sdctl, setup, counting)
    assert result.exit_code == 0 and "already there" in result.stdout, result.output
    assert counting.calls["upload_part"] == 0 and counting.calls["abort_multipart_upload"] == 1
    assert state.read() is None
    uploads = s3_client.list_multipart_uploads(Bucket=setup["bucket"]).get("Uploads", [])
    assert upload_id not in [u["UploadId"] for u in uploads]


def test_part_sizes():
    assert parts_of(11, 5) == [(1, 0, 5), (2, 5, 5), (3, 10, 1)]
    assert parts_of(10, 5) == [(1, 0, 5), (2, 5, 5)]
    assert part_size_for(10 * MIB, PART) == PART
    huge = 1024 * 1024 * MIB  # 1 TiB: 64 MiB parts would be 16 384 of them
    size = part_size_for(huge, 64 * MIB)
    assert size % MIB == 0 and len(range(0, huge, size)) <= MAX_PARTS
