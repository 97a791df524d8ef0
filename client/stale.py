"""Mark ``inprogress`` jobs whose worker is gone as ``failed`` ("interrupted"), from the client side.

The container fails its own interrupted job when it restarts (``running.json``),
but an instance that never comes back (scaled in, replaced, deleted endpoint)
leaves the record ``inprogress`` forever. A running job rewrites its
``heartbeat`` at least every few seconds (every step, and from a heartbeat thread
during fetches and loads), so one that has not beaten for :data:`DEFAULT_FAIL_AFTER`
(10 minutes) is dead.

The write follows the container's contract (``serve/records.py``): the whole
``job.json`` is rewritten with ``status: failed``, ``error``, ``finished``; then
the new index entry is PUT and the old one DELETEd (readers keep the most
advanced status while both exist). To avoid racing a live worker, the record is
re-read right before writing and left alone if anything in it changed. S3 has no
compare-and-swap here, so a worker that wakes up in the few milliseconds between
that read and the write could still be overwritten — after 10 minutes of silence.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

from client.config import EXIT_USAGE, CliError
from client.jobs import JobStore, index_key, iso, parse_time, utcnow

DEFAULT_FAIL_AFTER = 600.0
ENV = "SDCTL_STALE_AFTER"
INTERRUPTED = "interrupted"


def fail_after(option: float | None) -> float:
    """The threshold in seconds: the option, else ``$SDCTL_STALE_AFTER``, else 600; 0 turns marking off."""
    value = option
    if value is None:
        raw = os.environ.get(ENV)
        try:
            value = float(raw) if raw not in (None, "") else DEFAULT_FAIL_AFTER
        except ValueError:
            raise CliError(f"{ENV}={raw!r}: expected a number of seconds", EXIT_USAGE) from None
    if value < 0:
        raise CliError(f"--stale-after {value:g}: must be 0 (never) or more seconds", EXIT_USAGE)
    return value


def last_beat(record: dict) -> str | None:
    """The record's last sign of life: ``heartbeat``, else ``started``, else ``created``."""
    return record.get("heartbeat") or record.get("started") or record.get("created")


def silence(record: dict | None, now: datetime | None = None) -> float | None:
    """Seconds since an ``inprogress`` record's last beat; None for other statuses or unreadable times."""
    if not record or record.get("status") != "inprogress":
        return None
    beat = last_beat(record)
    if not beat:
        return None
    try:
        return ((now or utcnow()) - parse_time(beat)).total_seconds()
    except ValueError:
        return None


def mark_if_stale(store: JobStore, record: dict | None, threshold: float, now: datetime | None = None) -> dict | None:
    """Write ``record``'s job ``failed`` if it is ``inprogress`` and silent for over ``threshold`` s.

    Returns the record written, or None when nothing was written (not stale, marking
    off, or the record changed since it was read: its worker is alive).
    """
    age = silence(record, now)
    if threshold <= 0 or age is None or age <= threshold:
        return None
    job_id = record["id"]
    current = store.record(job_id)  # re-read right before writing: a live worker may have beaten since
    if current != record:
        return None
    beat = last_beat(record)
    failed = {**record, "status": "failed", "error": f"{INTERRUPTED} (no heartbeat since {beat})",
              "finished": iso(now or utcnow()), "failed_by": "sdctl"}
    store.loc.put(f"{job_id}/job.json", json.dumps(failed, indent=2).encode(), "application/json")
    try:
        created = parse_time(record["created"])
        task = record["task"]
    except (KeyError, ValueError):
        return failed  # a record without a valid created/task never had an index entry
    store.loc.put(index_key(created, task, "failed", job_id), b"", "application/octet-stream")
    store.loc.delete(index_key(created, task, "inprogress", job_id))
    return failed
