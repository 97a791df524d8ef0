"""The index contract as pure functions: key format, ordering, dedup, filters."""

from datetime import datetime, timedelta, timezone

from client.jobs import dedup, display_name, index_key, latest, parse_index_key, png_text

T0 = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=timezone.utc)


def test_key_format_matches_the_contract():
    key = index_key(T0, "txt2img", "created", "0f1e-uuid")
    ms = int(T0.timestamp() * 1000)
    assert key == f"_index/{9999999999999 - ms:013d}_20260304050607-txt2img-created-0f1e-uuid"
    entry = parse_index_key("some/prefix/" + key)
    assert (entry.ts, entry.task, entry.status, entry.job_id, entry.created_ms) == ("20260304050607", "txt2img", "created", "0f1e-uuid", ms)
    assert entry.name == display_name("20260304050607", "txt2img", "created", "0f1e-uuid")
    assert entry.key == key


def test_ascending_key_order_is_newest_first():
    keys = [index_key(T0 + timedelta(milliseconds=i * 7), "txt2img", "succeed", f"j{i}") for i in range(50)]
    assert [parse_index_key(k).job_id for k in sorted(keys)] == [f"j{i}" for i in range(49, -1, -1)]


def test_malformed_keys_are_skipped():
    for bad in ("_index/", "_index/123_x", "_index/abcdefghijklm_20260304050607-txt2img-created-j",
                "_index/0000000000001_2026-txt2img-created-j", "_index/0000000000001_20260304050607-txt2img-bogus-j"):
        assert parse_index_key(bad) is None, bad


def test_dedup_keeps_most_advanced_and_is_lazy():
    t = T0
    keys = sorted([
        index_key(t, "txt2img", "created", "a"), index_key(t, "txt2img", "inprogress", "a"),
        index_key(t, "txt2img", "created", "b"),  # same millisecond, other job
        index_key(t - timedelta(seconds=1), "txt2img", "failed", "c"), index_key(t - timedelta(seconds=1), "txt2img", "inprogress", "c"),
    ])
    got = [(e.job_id, e.status) for e in dedup(parse_index_key(k) for k in keys)]
    assert got == [("a", "inprogress"), ("b", "created"), ("c", "failed")]
    consumed = []

    def source():
        for k in keys:
            consumed.append(k)
            yield parse_index_key(k)

    first = next(dedup(source()))
    assert first.job_id in ("a", "b") and len(consumed) == 4  # read one key past the first rev group


def test_latest_filters_after_dedup():
    keys = sorted([index_key(T0, "txt2img", "created", "a"), index_key(T0, "txt2img", "succeed", "a"),
                   index_key(T0 - timedelta(minutes=1), "img2img", "created", "b")])
    entries = [parse_index_key(k) for k in keys]
    assert [e.job_id for e in latest(entries, 10, status="created")] == ["b"]  # a's stale "created" key ignored
    assert [e.job_id for e in latest(entries, 10, task="txt2img")] == ["a"]
    assert [e.job_id for e in latest(entries, 10, since=T0 - timedelta(seconds=1))] == ["a"]
    assert [e.job_id for e in latest(entries, 10, until=T0 - timedelta(seconds=1))] == ["b"]
    assert latest(entries, 0) == []


def test_png_text_reads_text_chunks():
    from tests.client.test_jobs import png_with_text

    assert png_text(png_with_text("héllo\nSteps: 2")) == "héllo\nSteps: 2"
    assert png_text(b"not a png") is None
