"""The client fails jobs whose worker is gone: inprogress + no heartbeat for --stale-after → failed "interrupted"."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from client.config import Clients
from client.jobs import JobStore, index_key, iso, parse_time, utcnow
from client.stale import mark_if_stale
from client.storage import open_location
from serve import jobs_index as container_index
from tests.client.conftest import created_at, write_job


@pytest.fixture
def out(s3_client, s3_bucket):
    return {"uri": f"s3://{s3_bucket}/out/", "bucket": s3_bucket, "clients": Clients(s3_factory=lambda: s3_client)}


def record_of(s3_client, bucket, job_id):
    return json.loads(s3_client.get_object(Bucket=bucket, Key=f"out/{job_id}/job.json")["Body"].read())


def index_keys(s3_client, bucket):
    return sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="out/_index/").get("Contents", []))


def running(s3_client, bucket, job_id, silent_for: float, i: int = 0):
    """An inprogress job created at created_at(i) whose last heartbeat was ``silent_for`` seconds ago."""
    beat = iso(utcnow() - timedelta(seconds=silent_for))
    return write_job(s3_client, bucket, "out/", job_id, created_at(i), "txt2img", "inprogress", heartbeat=beat, phase="generate")


def test_jobs_flags_but_only_marks_with_mark_stale(sdctl, out, s3_client):
    rec = running(s3_client, out["bucket"], "dead", 3600)
    running(s3_client, out["bucket"], "alive", 1, i=1)
    listed = sdctl("--output", out["uri"], "jobs", clients=out["clients"])
    assert listed.exit_code == 0, listed.output
    assert any(line.endswith("-inprogress-dead (stale?)") for line in listed.stdout.splitlines())
    assert record_of(s3_client, out["bucket"], "dead")["status"] == "inprogress"  # a plain listing writes nothing

    listed = sdctl("--output", out["uri"], "jobs", "--mark-stale", clients=out["clients"])
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert [line for line in lines if "dead" in line] == [f"{created_at(0):%Y%m%d%H%M%S}-txt2img-failed-dead"]
    assert [line for line in lines if "alive" in line] == [f"{created_at(1):%Y%m%d%H%M%S}-txt2img-inprogress-alive"]
    failed = record_of(s3_client, out["bucket"], "dead")
    assert failed["status"] == "failed" and failed["error"] == f"interrupted (no heartbeat since {rec['heartbeat']})"
    assert failed["phase"] == "generate" and failed["finished"] and failed["created"] == rec["created"]
    # the index moved the way the container moves it: the failed entry in, the inprogress entry out
    keys = index_keys(s3_client, out["bucket"])
    assert "out/" + container_index.index_key(failed) in keys
    assert "out/" + index_key(created_at(0), "txt2img", "inprogress", "dead") not in keys
    assert record_of(s3_client, out["bucket"], "alive")["status"] == "inprogress"


def test_threshold_from_flag_and_env(sdctl, out, s3_client):
    running(s3_client, out["bucket"], "j", 60)
    listed = sdctl("--output", out["uri"], "jobs", "--mark-stale", clients=out["clients"])
    assert "-inprogress-j" in listed.stdout  # 60 s of silence is below the 10 minute default
    listed = sdctl("--output", out["uri"], "jobs", "--mark-stale", clients=out["clients"], env={"SDCTL_STALE_AFTER": "30"})
    assert "-failed-j" in listed.stdout, listed.output
    running(s3_client, out["bucket"], "k", 60, i=1)
    result = sdctl("--output", out["uri"], "show", "k", "--stale-after", "0", clients=out["clients"])
    assert result.exit_code == 0 and record_of(s3_client, out["bucket"], "k")["status"] == "inprogress"  # 0 = never
    result = sdctl("--output", out["uri"], "show", "k", "--stale-after", "-1", clients=out["clients"])
    assert result.exit_code == 2 and "--stale-after" in result.output
    result = sdctl("--output", out["uri"], "jobs", "--mark-stale", clients=out["clients"], env={"SDCTL_STALE_AFTER": "soon"})
    assert result.exit_code == 2 and "SDCTL_STALE_AFTER" in result.output


def test_show_and_wait_mark_a_dead_job(sdctl, out, s3_client):
    running(s3_client, out["bucket"], "s", 3600)
    result = sdctl("--output", out["uri"], "show", "s", clients=out["clients"])
    assert result.exit_code == 0 and '"status": "failed"' in result.stdout and "marked failed" in result.stderr
    running(s3_client, out["bucket"], "w", 3600, i=1)
    result = sdctl("--output", out["uri"], "wait", "w", "--interval", "0.05", clients=out["clients"])
    assert result.exit_code == 1 and "interrupted (no heartbeat since" in result.stderr
    assert record_of(s3_client, out["bucket"], "w")["status"] == "failed"


def test_wait_leaves_a_live_job_alone(sdctl, out, s3_client):
    running(s3_client, out["bucket"], "live", 2)
    result = sdctl("--output", out["uri"], "wait", "live", "--interval", "0.05", "--timeout", "0.3", clients=out["clients"])
    assert result.exit_code == 1 and "still inprogress" in result.output
    assert record_of(s3_client, out["bucket"], "live")["status"] == "inprogress"


def test_never_overwrites_a_record_that_moved_on(out, s3_client):
    store = JobStore(open_location(out["uri"], lambda: s3_client))
    seen = running(s3_client, out["bucket"], "racy", 3600)
    # the worker was only slow: it beat (or finished) after we read the record
    running(s3_client, out["bucket"], "racy", 0)
    assert mark_if_stale(store, seen, 600) is None
    assert record_of(s3_client, out["bucket"], "racy")["status"] == "inprogress"
    write_job(s3_client, out["bucket"], "out/", "racy", created_at(0), "txt2img", "succeed")
    assert mark_if_stale(store, seen, 600) is None
    assert record_of(s3_client, out["bucket"], "racy")["status"] == "succeed"
    # terminal and fresh records are never candidates
    assert mark_if_stale(store, record_of(s3_client, out["bucket"], "racy"), 1) is None
    now = parse_time(seen["heartbeat"]) + timedelta(seconds=599)
    assert mark_if_stale(store, seen, 600, now=now) is None
