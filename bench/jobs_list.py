"""`sdctl jobs` (latest 10) against 100, 1 000 and 10 000 jobs in a real S3 server.

Writes index keys (and the newest records) into SeaweedFS, then times the
client's listing path — LIST the index newest-first, read the 10 records — and
counts S3 requests by kind. The point: flat in the number of jobs, not linear.

    python -m bench.jobs_list
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from client.jobs import JobStore, index_key, latest
from client.storage import S3Location
from tests.support.seaweed import SeaweedServer

SIZES = (100, 1_000, 10_000)


def main() -> None:
    server = SeaweedServer().start()
    try:
        client = server.client()
        calls: Counter = Counter()
        client.meta.events.register("before-call.s3.*", lambda model, **_: calls.update([model.name]))
        client.create_bucket(Bucket="jobs-bench")
        loc = S3Location("s3://jobs-bench/outputs/", client)
        store = JobStore(loc)
        start = datetime(2026, 1, 1, tzinfo=timezone.utc)
        written = 0
        rows = []
        with ThreadPoolExecutor(16) as pool:
            for size in SIZES:
                def put(i: int) -> None:
                    job_id = str(uuid.UUID(int=i))
                    created = start + timedelta(seconds=i)
                    status = "succeed" if i % 7 else "failed"
                    loc.put(index_key(created, "txt2img", status, job_id), b"")
                    if i >= size - 20:  # the newest records: the only ones a latest-10 listing reads
                        loc.put(f"{job_id}/job.json", f'{{"id": "{job_id}", "status": "{status}", "task": "txt2img"}}'.encode(), "application/json")

                list(pool.map(put, range(written, size)))
                written = size
                times = []
                for _ in range(5):
                    calls.clear()
                    t0 = time.perf_counter()
                    entries = latest(store.index_entries(), 10)
                    records = [store.record(e.job_id) for e in entries]
                    times.append(time.perf_counter() - t0)
                    assert len(records) == 10 and all(records), "listing lost records"
                    assert entries[0].job_id == str(uuid.UUID(int=size - 1)), "not newest first"
                rows.append((size, statistics.median(times), dict(calls)))
    finally:
        server.stop()
    base = rows[0][1]
    for size, t, kinds in rows:
        print(f"{size:>6} jobs: latest 10 in {t * 1000:6.1f} ms  ({t / base:.2f}x of 100 jobs)  S3 requests {kinds}")


if __name__ == "__main__":
    main()
