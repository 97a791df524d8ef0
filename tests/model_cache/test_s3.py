"""S3 helpers against a real SeaweedFS: URI parsing, MD5-checked uploads (downloads: test_transfer.py)."""


import pytest
from botocore.exceptions import ClientError

from model_cache.s3 import make_s3_client, parse_s3_uri, put_bytes
from pipelines.errors import InvalidParameter


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://bucket/prefix/", ("bucket", "prefix/")),
        ("s3://my.bucket-1/a/b/c.safetensors", ("my.bucket-1", "a/b/c.safetensors")),
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
    ],
)
def test_parse_s3_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize(
    "bad",
    ["", "bucket/key", "http://bucket/key", "s3:/bucket", "s3://", "s3://Bucket/x", "s3://ab/x", "s3://b_b/x",
     "s3://bucket/../x", "s3://bucket/a/./b", "s3://bucket//x", "s3://bucket/a\\b", "s3://bucket/a\x00", "s3://-bucket/x"],
)
def test_parse_s3_uri_rejects(bad):
    with pytest.raises(InvalidParameter) as info:
        parse_s3_uri(bad, field="models.Lora")
    assert info.value.field == "models.Lora"


def test_make_s3_client_talks_to_the_server(s3_server, s3_bucket, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    client = make_s3_client(endpoint_url=s3_server.endpoint_url, region="us-east-1")
    assert client.meta.config.s3["addressing_style"] == "path"
    assert put_bytes(client, s3_bucket, "k", b"data", "text/plain")
    assert client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"data"


def test_put_with_wrong_md5_is_rejected(s3_client, s3_bucket):
    import base64
    import hashlib

    wrong = base64.b64encode(hashlib.md5(b"other bytes").digest()).decode()
    with pytest.raises(ClientError) as info:
        s3_client.put_object(Bucket=s3_bucket, Key="x", Body=b"bytes", ContentMD5=wrong)
    assert info.value.response["Error"]["Code"] in ("BadDigest", "InvalidDigest")
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0
