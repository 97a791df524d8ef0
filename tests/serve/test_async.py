"""Async job semantics against a real server: records + index, idempotent retries, cancel, heartbeat, crash recovery."""

import json
import os
import signal
import threading
import time

import httpx
import pytest

from serve.jobs_index import index_key, parse_index_key
from serve.outputs import open_output
from tests.serve.test_lifecycle import make_store, wait_status
from tests.support.server import ServerProcess, running_server

SMALL = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1}
LONG = {"prompt": "x", "steps": 150, "width": 256, "height": 256, "batch_size": 2, "n_iter": 8, "seed": 1}


@pytest.fixture(scope="module")
def local(tiny_model_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    store = make_store(tiny_model_store, root / "models")
    with running_server(store, root, SAGEMAKER_ENDPOINT_NAME="ep-test") as proc:
        yield proc


def index_of(output, job_id):
    writer = open_output(str(output), s3_client_factory=lambda: None) if isinstance(output, os.PathLike) else output
    return [parse_index_key(k) for k in writer.list_prefix("_index/") if parse_index_key(k).job_id == job_id]


def post(url, body, timeout=120):
    return httpx.post(url + "/invocations", json=body, timeout=timeout)


def test_async_answer_is_the_record_and_a_second_delivery_does_not_regenerate(local):
    body = {"id": "twice", "payload": SMALL, "output": {"inline": False}}
    first = post(local.url, body)
    assert first.status_code == 200, first.text
    record = first.json()  # the small job record, which SageMaker stores as the async output
    assert record["id"] == "twice" and "images" in record and "info" not in record
    assert set(record) >= {"id", "status", "created", "started", "finished", "heartbeat", "endpoint", "images", "timings"}
    assert record["status"] == "succeed" and record["endpoint"] == "ep-test" and record["phase"] is None
    assert json.loads((local.output / "twice" / "job.json").read_text()) == record
    [entry] = index_of(local.output, "twice")
    assert entry.key == index_key(record) and entry.status == "succeed"
    mtime = (local.output / "twice" / "image-0.png").stat().st_mtime_ns

    again = post(local.url, body)
    assert again.status_code == 200 and again.json() == record  # same timings, same times: not regenerated
    assert (local.output / "twice" / "image-0.png").stat().st_mtime_ns == mtime
    inline = post(local.url, {**body, "output": {"inline": True}})
    assert inline.status_code == 200 and inline.json()["job"] == record
    import base64

    assert base64.b64decode(inline.json()["images"][0]) == (local.output / "twice" / "image-0.png").read_bytes()
    assert json.loads(inline.json()["info"])["all_seeds"] == [1]
    assert len(index_of(local.output, "twice")) == 1


def test_cancel_marker_stops_a_running_job_with_heartbeats_and_conflicts(local):
    results = []
    body = {"id": "to-cancel", "payload": LONG, "output": {"inline": False}}
    t = threading.Thread(target=lambda: results.append(post(local.url, body)))
    t.start()
    wait_status(local, "busy", generating=True)
    path = local.output / "to-cancel" / "job.json"
    beats = set()
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        record = json.loads(path.read_text())
        beats.add((record["heartbeat"], record["progress"]))
        time.sleep(0.2)
    assert record["status"] == "inprogress" and record["phase"] == "generate"
    assert len(beats) >= 2 and record["progress"] > 0  # heartbeat rewritten while generating
    assert [e.status for e in index_of(local.output, "to-cancel")] == ["inprogress"]

    dup = post(local.url, body, timeout=10)
    assert dup.status_code == 409 and dup.json()["job_id"] == "to-cancel" and dup.json()["error"] == "conflict"

    r = httpx.post(local.url + "/jobs/to-cancel/cancel", timeout=10)
    assert r.status_code == 202 and r.json()["cancel"].endswith("to-cancel/cancel")
    started = time.monotonic()
    t.join(30)
    assert time.monotonic() - started < 10
    answer = results[0]
    assert answer.status_code == 503 and answer.json()["error"] == "cancelled", answer.text
    record = json.loads(path.read_text())
    assert record["status"] == "cancelled" and record["phase"] == "generate" and record["finished"]
    assert [e.status for e in index_of(local.output, "to-cancel")] == ["cancelled"]
    # a re-delivery of a cancelled job stays cancelled (the marker is still there) without generating
    again = post(local.url, body, timeout=30)
    assert again.status_code == 503 and json.loads(path.read_text())["status"] == "cancelled"


def test_killed_server_leaves_an_interrupted_record_after_restart_on_s3(tiny_model_store, tmp_path, s3_env, s3_client, s3_bucket):
    store = make_store(tiny_model_store, tmp_path / "models")
    uri = f"s3://{s3_bucket}/outputs/"
    env = {**s3_env, "MODEL_STORE": str(store), "OUTPUT": uri, "CACHE_DIR": str(tmp_path / "cache"), "DEFAULT_CHECKPOINT": "tiny-sd1"}
    writer = open_output(uri, s3_client_factory=lambda: s3_client)
    # the client wrote "created" (and its index entry) before invoking
    created = {"id": "s3-job", "task": "txt2img", "status": "created", "created": "2024-03-04T05:06:07.890Z", "input": "s3://x/in.json"}
    writer.put_json("s3-job", "job.json", created)
    writer.put_key(index_key(created))

    proc = ServerProcess(env, log_path=tmp_path / "server.log").start()
    try:
        r = post(proc.url, {"id": "s3-job", "payload": SMALL, "output": {"inline": False}})
        assert r.status_code == 200, r.text
        assert r.json()["created"] == created["created"] and r.json()["input"] == "s3://x/in.json"
        assert [e.status for e in index_of(writer, "s3-job")] == ["succeed"]

        threading.Thread(target=lambda: _swallow(post, proc.url, {"id": "killed", "payload": LONG}), daemon=True).start()
        wait_status(proc, "busy", generating=True)
        assert (tmp_path / "cache" / "running.json").exists()
        os.killpg(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(10)
    finally:
        proc.stop()
    assert writer.get_json("killed", "job.json")["status"] == "inprogress"

    proc = ServerProcess(env, log_path=tmp_path / "server2.log").start()
    try:
        record = writer.get_json("killed", "job.json")
        assert record["status"] == "failed" and record["error"] == "interrupted" and record["phase"] == "generate", record
        assert [e.status for e in index_of(writer, "killed")] == ["failed"]
        assert not (tmp_path / "cache" / "running.json").exists()
    finally:
        proc.stop()


def _swallow(fn, *args):
    try:
        fn(*args)
    except httpx.HTTPError:
        pass
