"""Job records and the job index: pure index functions, writer methods, transitions (local and S3)."""

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from pipelines.errors import InvalidParameter
from serve.jobs_index import (
    STATUS_ORDER,
    IndexEntry,
    display_name,
    index_key,
    latest,
    parse_index_key,
    parse_many,
)
from serve.outputs import OutputWriter, check_job_id, open_output
from serve.records import JobRecorder, RunningFile, recover_interrupted


def rec(job_id, created, status="created", task="txt2img"):
    return {"id": job_id, "task": task, "status": status, "created": created}


def test_index_key_layout_and_round_trip():
    key = index_key(rec("ab-12_x.y", "2024-05-06T07:08:09.123Z", "inprogress"))
    ms = int(datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=timezone.utc).timestamp() * 1000)
    assert key == f"_index/{9999999999999 - ms:013d}_20240506070809-txt2img-inprogress-ab-12_x.y"
    entry = parse_index_key("s3://b/out/" + key)
    assert entry == IndexEntry(f"{9999999999999 - ms:013d}", "20240506070809", "txt2img", "inprogress", "ab-12_x.y")
    assert display_name(entry) == "20240506070809-txt2img-inprogress-ab-12_x.y"
    assert entry.key == key
    assert entry.created == datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=timezone.utc)
    # an offset time is the same instant
    assert index_key(rec("ab-12_x.y", "2024-05-06T09:08:09.123+02:00", "inprogress")) == key


@pytest.mark.parametrize("bad", ["_index/x", "123_20240506070809-txt2img-created-a", "0000000000001_2024-txt2img-created-a",
                                 "0000000000001_20240506070809-txt2img-weird-a", "0000000000001_20240506070809-txt2img-created"])
def test_parse_rejects_non_keys(bad):
    with pytest.raises(ValueError):
        parse_index_key(bad)
    assert parse_many([bad]) == []


def test_ascending_keys_are_newest_first():
    keys = [index_key(rec(f"j{i}", f"2024-01-01T00:00:{i:02d}.000Z")) for i in range(12)]
    assert [parse_index_key(k).job_id for k in sorted(keys)] == [f"j{i}" for i in reversed(range(12))]


def test_latest_dedups_by_most_advanced_status_and_filters():
    keys = []
    for i in range(20):
        created = f"2024-01-01T00:{i:02d}:00.000Z"
        task = "img2img" if i % 5 == 0 else "txt2img"
        final = ["succeed", "failed", "cancelled", "inprogress"][i % 4]
        keys.append(index_key(rec(f"j{i:02d}", created, final, task)))
        if i % 3 == 0:  # a crash between PUT new and DELETE old leaves the earlier entry too
            keys.append(index_key(rec(f"j{i:02d}", created, "created", task)))
    entries = parse_many(sorted(keys))
    top = latest(entries, 10)
    assert [e.job_id for e in top] == [f"j{i:02d}" for i in range(19, 9, -1)]
    assert len({e.job_id for e in latest(entries, None)}) == 20 == len(latest(entries, None))
    assert all(STATUS_ORDER[e.status] > 0 for e in latest(entries, None))
    assert [e.job_id for e in latest(entries, None, status="created")] == []
    assert [e.job_id for e in latest(entries, 3, status="succeed")] == ["j16", "j12", "j08"]
    assert [e.job_id for e in latest(entries, None, status=["failed", "cancelled"], task="txt2img")][:3] == ["j18", "j17", "j14"]
    assert [e.job_id for e in latest(entries, None, task="img2img")] == ["j15", "j10", "j05", "j00"]
    since = [e.job_id for e in latest(entries, None, since="2024-01-01T00:17:00Z")]
    assert since == ["j19", "j18", "j17"]
    window = latest(entries, None, since=datetime(2024, 1, 1, 0, 3), until="20240101000500")
    assert [e.job_id for e in window] == ["j05", "j04", "j03"]


@pytest.fixture(params=["local", "s3"])
def writer(request, tmp_path) -> OutputWriter:
    if request.param == "local":
        return open_output(str(tmp_path / "out"), s3_client_factory=lambda: pytest.fail("no client for local"))
    client = request.getfixturevalue("s3_client")
    bucket = request.getfixturevalue("s3_bucket")
    return open_output(f"s3://{bucket}/outputs", s3_client_factory=lambda: client)


def test_writer_keys_exists_delete_list(writer):
    assert not writer.exists("job-1", "cancel")
    writer.put_bytes("job-1", "cancel", b"", "application/octet-stream")
    assert writer.exists("job-1", "cancel") and writer.get_bytes("job-1", "cancel") == b""
    assert writer.get_bytes("job-1", "nope.png") is None
    long_id = "x" * 128
    keys = [f"_index/{n:013d}_20240101000000-txt2img-created-{long_id}" for n in (3, 1, 2)]
    for key in keys:
        writer.put_key(key)
    assert writer.list_prefix("_index/") == sorted(keys)
    assert writer.list_prefix("_index/0000000000002") == [keys[2]]
    writer.delete_key(keys[0])
    writer.delete_key(keys[0])  # absent is fine
    assert writer.list_prefix("_index/") == sorted(keys[1:])
    assert writer.list_job_ids() == ["job-1"]  # the index is not a job
    for bad in ("../x", "_index/../../etc", "a//b", "_index/a b"):
        with pytest.raises(InvalidParameter):
            writer.put_key(bad)
    with pytest.raises(InvalidParameter):
        check_job_id("_index")


def _job(job_id="job-7"):
    return SimpleNamespace(job_id=job_id, task="txt2img", params=SimpleNamespace(checkpoint="tiny"), warnings=[])


def test_transitions_move_the_index_entry(writer):
    recorder = JobRecorder.open(writer, _job(), None, endpoint="ep-1")
    assert not recorder.written
    seen = []
    for status in ("created", "inprogress", "succeed"):
        recorder.transition(status)
        index = writer.list_prefix("_index/")
        seen.append(index)
        assert len(index) == 1 and parse_index_key(index[0]).status == status
        record = writer.get_json("job-7", "job.json")
        assert record["status"] == status and record["endpoint"] == "ep-1"
    assert len({parse_index_key(k[0]).rev for k in seen}) == 1  # created time never moves
    assert writer.get_json("job-7", "job.json")["finished"]
    assert not recorder.heartbeat(0.5, force=True)  # terminal: heartbeats are dropped


def test_client_created_record_keeps_its_time_and_fields(writer):
    created = {**rec("job-8", "2023-02-03T04:05:06.789Z"), "endpoint": "from-client", "input": "s3://x/in.json"}
    writer.put_json("job-8", "job.json", created)
    writer.put_key(index_key(created))
    recorder = JobRecorder.open(writer, _job("job-8"), writer.get_json("job-8", "job.json"), endpoint="ep-2")
    assert recorder.written
    recorder.transition("inprogress")
    record = writer.get_json("job-8", "job.json")
    assert record["created"] == "2023-02-03T04:05:06.789Z" and record["endpoint"] == "from-client" and record["input"] == "s3://x/in.json"
    assert [parse_index_key(k).status for k in writer.list_prefix("_index/")] == ["inprogress"]
    assert parse_index_key(writer.list_prefix("_index/")[0]).ts == "20230203040506"


def test_heartbeat_is_throttled():
    now = [0.0]
    writes = []
    fake = SimpleNamespace(put_json=lambda *a: writes.append(dict(a[2])), put_key=lambda k: None, delete_key=lambda k: None)
    recorder = JobRecorder(fake, {"id": "j", "task": "txt2img", "status": "created", "created": "2024-01-01T00:00:00Z"}, clock=lambda: now[0])
    recorder.transition("inprogress")
    assert not recorder.heartbeat(0.1)  # within a second of the transition
    now[0] = 1.0
    assert recorder.heartbeat(0.2)
    now[0] = 1.5
    assert not recorder.heartbeat(0.3)
    now[0] = 2.1
    assert recorder.heartbeat(0.4)
    assert [w["progress"] for w in writes[1:]] == [0.2, 0.4] and all(w["heartbeat"] for w in writes[1:])


def test_recover_interrupted_fails_the_job_and_forgets_it(writer, tmp_path):
    recorder = JobRecorder.open(writer, _job("job-9"), None, endpoint=None)
    recorder.transition("created")
    recorder.transition("inprogress")
    uri = writer.description.removeprefix("local folder ")
    RunningFile(tmp_path / "cache").write("job-9", uri, "generate")
    settings = SimpleNamespace(cache_dir=tmp_path / "cache", s3_endpoint_url=None, aws_region=None)
    if uri.startswith("s3://"):
        import serve.records as records

        real = records.open_writer_at
        records.open_writer_at = lambda s, u: writer
        try:
            recover_interrupted(settings)
        finally:
            records.open_writer_at = real
    else:
        recover_interrupted(settings)
    record = writer.get_json("job-9", "job.json")
    assert record["status"] == "failed" and record["error"] == "interrupted" and record["phase"] == "generate"
    assert [parse_index_key(k).status for k in writer.list_prefix("_index/")] == ["failed"]
    assert RunningFile(tmp_path / "cache").read() is None
    assert recover_interrupted(settings) is None
