"""Job outputs in a local folder and in S3 (real SeaweedFS)."""

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from pipelines.errors import InvalidParameter
from serve.outputs import LocalOutputs, OutputWriter, S3Outputs, check_job_id, open_output


@pytest.fixture(params=["local", "s3"])
def writer(request, tmp_path) -> OutputWriter:
    if request.param == "local":
        return open_output(str(tmp_path / "out"), s3_client_factory=lambda: pytest.fail("no client for local"))
    client = request.getfixturevalue("s3_client")
    bucket = request.getfixturevalue("s3_bucket")
    return open_output(f"s3://{bucket}/outputs", s3_client_factory=lambda: client)


def test_put_and_get(writer):
    assert isinstance(writer, OutputWriter)
    png = b"\x89PNG\r\n\x1a\nfake"
    uri = writer.put_bytes("job-1", "image-0.png", png, "image/png")
    assert uri == writer.uri("job-1", "image-0.png")
    assert uri.endswith("job-1/image-0.png")
    writer.put_json("job-1", "job.json", {"id": "job-1", "status": "created", "prompt": "ünïcode"})
    writer.put_json("job-1", "job.json", {"id": "job-1", "status": "succeed"})  # overwrite whole
    assert writer.get_json("job-1", "job.json") == {"id": "job-1", "status": "succeed"}
    assert writer.get_json("job-1", "params.json") is None
    assert writer.get_json("job-2", "job.json") is None
    writer.put_json("job-2", "job.json", {"id": "job-2"})
    assert writer.list_job_ids() == ["job-1", "job-2"]


def test_local_files_land_atomically(tmp_path):
    writer = LocalOutputs(tmp_path)
    writer.put_bytes("j", "image-0.png", b"png", "image/png")
    writer.put_json("j", "job.json", {"a": 1})
    assert sorted(os.listdir(tmp_path / "j")) == ["image-0.png", "job.json"]  # no temp files left
    assert (tmp_path / "j" / "image-0.png").read_bytes() == b"png"
    assert writer.uri("j", "job.json") == str(tmp_path / "j" / "job.json")
    assert (tmp_path / "j" / "job.json").stat().st_mode & 0o777 == 0o644


def test_s3_objects_have_content_types(s3_client, s3_bucket):
    writer = S3Outputs(f"s3://{s3_bucket}/out/", s3_client)
    assert writer.uri("j", "image-0.png") == f"s3://{s3_bucket}/out/j/image-0.png"
    writer.put_bytes("j", "image-0.png", b"png-bytes", "image/png")
    writer.put_json("j", "params.json", {"seed": 1})
    head = s3_client.head_object(Bucket=s3_bucket, Key="out/j/image-0.png")
    assert head["ContentType"] == "image/png" and head["ContentLength"] == 9
    head = s3_client.head_object(Bucket=s3_bucket, Key="out/j/params.json")
    assert head["ContentType"] == "application/json"


def test_s3_put_with_wrong_md5_is_rejected(s3_client, s3_bucket):
    wrong = base64.b64encode(hashlib.md5(b"what we meant to send").digest()).decode()
    with pytest.raises(ClientError) as info:
        s3_client.put_object(Bucket=s3_bucket, Key="out/j/job.json", Body=b"corrupted", ContentMD5=wrong)
    assert info.value.response["Error"]["Code"] in ("BadDigest", "InvalidDigest")
    assert S3Outputs(f"s3://{s3_bucket}/out/", s3_client).get_json("j", "job.json") is None


@pytest.mark.parametrize("good", ["a", "job-1", "A.b_c-9", "x" * 128, "2026-11-23T10-00-00-abc"])
def test_job_id_accepted(good):
    assert check_job_id(good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../x", "a\\b", "x" * 129, "a b", "a\x00", "%2e%2e", "é", None])
def test_job_id_rejected(bad, tmp_path):
    with pytest.raises(InvalidParameter) as info:
        check_job_id(bad)
    assert info.value.field == "id"
    with pytest.raises(InvalidParameter):
        LocalOutputs(tmp_path).put_json(bad, "job.json", {})
    assert list(tmp_path.iterdir()) == []


def test_file_names_are_checked_too(tmp_path):
    with pytest.raises(InvalidParameter):
        LocalOutputs(tmp_path).put_bytes("j", "../escape.png", b"", "image/png")


def test_open_output_rejects_other_schemes(tmp_path):
    for bad in ("gs://b/x", "", "s3://Bad/x"):
        with pytest.raises(InvalidParameter) as info:
            open_output(bad, s3_client_factory=lambda: None)
        assert info.value.field == "output.uri"
    assert isinstance(open_output(f"file://{tmp_path}", s3_client_factory=lambda: None), LocalOutputs)


def test_no_torch_import():
    code = "import sys, serve.outputs, model_cache.store; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], check=True)
