"""`sdctl jobs|show|get|wait|cancel` over a real S3 (SeaweedFS) holding synthetic jobs."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from client import storage
from client.config import Clients
from client.jobs import index_key, iso, utcnow
from tests.client.conftest import CountingClient, created_at, put, write_job

TASKS = ("txt2img", "img2img")
STATUSES = ("succeed", "failed", "succeed", "cancelled", "created")


def name(i: int, task: str, status: str) -> str:
    return f"{created_at(i).strftime('%Y%m%d%H%M%S')}-{task}-{status}-job-{i:02d}"


@pytest.fixture
def thirty(s3_client, s3_bucket):
    """30 jobs (job-00 oldest … job-29 newest) with varied task/status/checkpoint/endpoint."""
    prefix = "out/"
    jobs = {}
    for i in range(30):
        task, status = TASKS[i % 2], STATUSES[i % 5]
        write_job(s3_client, s3_bucket, prefix, f"job-{i:02d}", created_at(i), task, status,
                  checkpoint="tiny-sd1.safetensors" if i % 3 == 0 else "other", endpoint="ep-a" if i % 4 == 0 else "ep-b")
        jobs[i] = (task, status)
    # job-27: the writer PUT "inprogress" then "succeed", and the old key was not deleted yet.
    put(s3_client, s3_bucket, prefix + index_key(created_at(27), "img2img", "inprogress", "job-27"))
    return {"bucket": s3_bucket, "prefix": prefix, "jobs": jobs, "uri": f"s3://{s3_bucket}/{prefix}"}


def counting(s3_client):
    client = CountingClient(s3_client)
    return client, Clients(s3_factory=lambda: client)


def lines(result):
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_latest_ten_newest_first_in_one_list_and_no_record_reads(sdctl, thirty, s3_client):
    client, clients = counting(s3_client)
    out = lines(sdctl("--output", thirty["uri"], "jobs", clients=clients))
    expected = [name(i, *thirty["jobs"][i]) for i in range(29, 19, -1)]
    assert out == expected
    assert client.calls["list_objects_v2"] <= 2
    assert client.calls["get_object"] == 0  # no inprogress job among them: the index answers alone


def test_duplicate_entries_keep_the_most_advanced_status(sdctl, thirty, s3_client):
    out = lines(sdctl("--output", thirty["uri"], "jobs", "-n", "5", clients=counting(s3_client)[1]))
    assert [line for line in out if "job-27" in line] == [name(27, "img2img", "succeed")]
    assert len(out) == 5


def test_all_and_key_filters(sdctl, thirty, s3_client):
    uri, jobs = thirty["uri"], thirty["jobs"]
    assert len(lines(sdctl("--output", uri, "jobs", "--all", clients=counting(s3_client)[1]))) == 30
    out = lines(sdctl("--output", uri, "jobs", "--all", "--status", "failed", clients=counting(s3_client)[1]))
    assert out == [name(i, *jobs[i]) for i in range(29, -1, -1) if jobs[i][1] == "failed"]
    out = lines(sdctl("--output", uri, "jobs", "-n", "3", "--task", "img2img", "--status", "succeed", clients=counting(s3_client)[1]))
    assert out == [name(i, *jobs[i]) for i in range(29, -1, -1) if jobs[i] == ("img2img", "succeed")][:3]


def test_time_range_uses_the_index(sdctl, thirty, s3_client):
    client, clients = counting(s3_client)
    since, until = iso(created_at(5)), iso(created_at(9))
    out = lines(sdctl("--output", thirty["uri"], "jobs", "--all", "--since", since, "--until", until, clients=clients))
    assert out == [name(i, *thirty["jobs"][i]) for i in range(9, 4, -1)]
    assert client.calls["get_object"] == 0 and client.calls["list_objects_v2"] == 1


def test_checkpoint_and_endpoint_read_only_the_records_needed(sdctl, thirty, s3_client):
    client, clients = counting(s3_client)
    out = lines(sdctl("--output", thirty["uri"], "jobs", "-n", "2", "--checkpoint", "tiny-sd1", clients=clients))
    assert out == [name(27, "img2img", "succeed"), name(24, *thirty["jobs"][24])]
    assert client.calls["get_object"] == 6  # records of job-29 … job-24, then it stops at the 2nd match
    client, clients = counting(s3_client)
    out = lines(sdctl("--output", thirty["uri"], "jobs", "-n", "3", "--endpoint", "ep-a", clients=clients))
    assert out == [name(i, *thirty["jobs"][i]) for i in (28, 24, 20)]
    assert client.calls["get_object"] == 10  # job-29 … job-20


def test_paging_is_lazy(sdctl, thirty, s3_client, monkeypatch):
    monkeypatch.setattr(storage, "PAGE", 8)
    client, clients = counting(s3_client)
    out = lines(sdctl("--output", thirty["uri"], "jobs", "-n", "3", clients=clients))
    assert len(out) == 3 and client.calls["list_objects_v2"] == 1
    client, clients = counting(s3_client)
    assert len(lines(sdctl("--output", thirty["uri"], "jobs", "--all", clients=clients))) == 30
    assert client.calls["list_objects_v2"] == 4  # 31 keys / 8


def test_stale_inprogress_and_json(sdctl, s3_client, s3_bucket):
    uri = f"s3://{s3_bucket}/o/"
    write_job(s3_client, s3_bucket, "o/", "dead", created_at(1), "txt2img", "inprogress")  # heartbeat in 2026-01-01
    now = utcnow()
    write_job(s3_client, s3_bucket, "o/", "alive", now, "txt2img", "inprogress", heartbeat=iso(now))
    out = lines(sdctl("--output", uri, "jobs", clients=counting(s3_client)[1]))
    assert out[0].endswith("-txt2img-inprogress-alive")
    assert out[1].endswith("-txt2img-inprogress-dead (stale?)")
    rows = json.loads(sdctl("--output", uri, "jobs", "--json", clients=counting(s3_client)[1]).stdout)
    assert [(r["id"], r["stale"]) for r in rows] == [("alive", False), ("dead", True)]
    assert rows[0]["record"]["status"] == "inprogress"


def test_jobs_errors(sdctl, s3_client, s3_bucket, tmp_path):
    assert sdctl("jobs").exit_code == 2  # no --output
    assert sdctl("--output", f"s3://{s3_bucket}/x/", "jobs", "--status", "done", clients=counting(s3_client)[1]).exit_code == 2
    assert sdctl("--output", f"s3://{s3_bucket}/x/", "jobs", "--since", "yesterday", clients=counting(s3_client)[1]).exit_code == 2
    r = sdctl("--output", "s3://no-such-bucket-sdctl/x/", "jobs", clients=counting(s3_client)[1])
    assert r.exit_code == 5 and "bucket" in r.output
    assert sdctl("--output", str(tmp_path), "jobs").stdout == ""  # empty local OUTPUT


def png_with_text(text: str) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    itxt = b"parameters\x00\x00\x00\x00\x00" + text.encode("utf-8")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"iTXt", itxt) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b"")


def test_show_get_cancel(sdctl, s3_client, s3_bucket, tmp_path):
    uri, clients = f"s3://{s3_bucket}/o/", counting(s3_client)[1]
    write_job(s3_client, s3_bucket, "o/", "j1", created_at(3), "txt2img", "succeed")
    put(s3_client, s3_bucket, "o/j1/params.json", b'{"params": {"seeds": [42]}}')
    put(s3_client, s3_bucket, "o/j1/image-0.png", png_with_text("a lighthouse — at dusk\nSteps: 2, Seed: 42"))
    put(s3_client, s3_bucket, "o/j1/image-1.png", png_with_text("x"))
    result = sdctl("--output", uri, "show", "j1", clients=clients)
    assert result.exit_code == 0, result.output
    assert '"status": "succeed"' in result.stdout and '"seeds"' in result.stdout
    assert "a lighthouse — at dusk\nSteps: 2, Seed: 42" in result.stdout
    result = sdctl("--output", uri, "get", "j1", "-o", tmp_path / "dl", clients=clients)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["image-0.png", "image-1.png", "job.json", "params.json"]
    assert sdctl("--output", uri, "cancel", "j1", clients=clients).exit_code == 0
    s3_client.head_object(Bucket=s3_bucket, Key="o/j1/cancel")
    for command in (["show", "nope"], ["get", "nope", "-o", tmp_path / "x"], ["cancel", "nope"], ["wait", "nope"]):
        result = sdctl("--output", uri, *command, clients=clients)
        assert result.exit_code == 4 and "nope not found" in result.output, command


def test_wait_follows_progress_and_exit_codes(sdctl, s3_client, s3_bucket):
    uri, clients = f"s3://{s3_bucket}/o/", counting(s3_client)[1]
    write_job(s3_client, s3_bucket, "o/", "ok", created_at(1), "txt2img", "succeed")
    write_job(s3_client, s3_bucket, "o/", "bad", created_at(2), "txt2img", "failed", error="CUDA out of memory")
    write_job(s3_client, s3_bucket, "o/", "cx", created_at(3), "txt2img", "cancelled")
    write_job(s3_client, s3_bucket, "o/", "slow", utcnow(), "txt2img", "inprogress", heartbeat=iso(utcnow()))
    assert sdctl("--output", uri, "wait", "ok", clients=clients).exit_code == 0
    result = sdctl("--output", uri, "wait", "bad", clients=clients)
    assert result.exit_code == 1 and "CUDA out of memory" in result.output
    assert sdctl("--output", uri, "wait", "cx", clients=clients).exit_code == 1
    result = sdctl("--output", uri, "wait", "slow", "--interval", "0.05", "--timeout", "0.2", clients=clients)
    assert result.exit_code == 1 and "still inprogress" in result.output


def test_wait_sees_the_transition(sdctl, s3_client, s3_bucket):
    import threading

    uri, clients = f"s3://{s3_bucket}/o/", counting(s3_client)[1]
    rec = write_job(s3_client, s3_bucket, "o/", "j", utcnow(), "txt2img", "inprogress", heartbeat=iso(utcnow()), progress=0.3)

    def finish():
        put(s3_client, s3_bucket, "o/j/job.json", json.dumps({**rec, "status": "succeed", "progress": 1.0}).encode())

    timer = threading.Timer(0.3, finish)
    timer.start()
    try:
        result = sdctl("--output", uri, "wait", "j", "--interval", "0.05", "--timeout", "20", clients=clients)
    finally:
        timer.join()
    assert result.exit_code == 0, result.output
    assert "j succeed" in result.stdout
