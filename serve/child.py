"""Main loop of the worker process (spawned by :class:`serve.worker.WorkerHandle`).

Speaks to the HTTP process in small tuples on the events queue:
``("ready", info)``, ``("fatal", reason)``, ``("started", job_id)``,
``("done", job_id, result)``, ``("failed", job_id, error_dict)``.
Questions come on their own queue and are answered by a thread even while a
job runs: ``("cache", query_id)`` → ``("answer", query_id, snapshot)``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from pipelines.errors import Cancelled, SDError

log = logging.getLogger("serve.worker")


def run_worker(settings_dict: dict, jobs, events, draining, abort, queries=None) -> None:
    """Initialise the engine, then run jobs until the ``None`` sentinel arrives."""
    # The HTTP process owns shutdown: a SIGTERM/SIGINT sent to the whole process
    # group must not kill the job mid-step; we stop through `draining`/`abort`.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from serve.logs import configure_logging
    from serve.settings import Settings

    settings = Settings(**settings_dict)
    configure_logging(settings.log_level)
    # a job the previous worker left running (kill -9, instance restart) is failed "interrupted"
    from serve.records import recover_interrupted

    recover_interrupted(settings)
    try:
        from serve.executor import Engine

        engine = Engine(settings)
    except Exception as exc:  # a worker that cannot start makes /ping fail
        log.exception("worker failed to start")
        events.put(("fatal", f"worker failed to start: {type(exc).__name__}: {exc}"))
        return
    if queries is not None:
        threading.Thread(target=_answer_queries, args=(engine, queries, events), name="sd-worker-queries", daemon=True).start()
    events.put(("ready", engine.describe()))
    while True:
        job = jobs.get()
        if job is None:
            break
        events.put(("started", job.job_id))
        if draining.is_set():
            err = Cancelled("the server shut down before the job started")
            engine.record_failure(job, err)
            _fail(events, job.job_id, err)
            continue
        try:
            result = engine.run(job, should_abort=abort.is_set, on_progress=_progress_reporter(events, job.job_id))
        except SDError as err:
            _fail(events, job.job_id, err)
        except BaseException as exc:  # noqa: BLE001 - a job must always end with an event
            log.exception("job %s crashed", job.job_id)
            _fail(events, job.job_id, SDError(f"{type(exc).__name__}: {exc}"))
        else:
            events.put(("done", job.job_id, result))
    log.info("worker stopped")


def _progress_reporter(events, job_id: str, every: float = 0.25):
    """Send ``("progress", job_id, fraction)`` at most every ``every`` seconds (and at the end)."""
    last = [0.0]

    def report(fraction: float) -> None:
        now = time.monotonic()
        if now - last[0] >= every or fraction >= 1.0:
            last[0] = now
            events.put(("progress", job_id, round(fraction, 4)))

    return report


def _answer_queries(engine, queries, events) -> None:
    """Answer ``("cache", query_id)`` from the cache's own bookkeeping (no torch call, no wait for the job)."""
    while True:
        try:
            kind, query_id = queries.get()
        except (EOFError, OSError):
            return
        try:
            answer = engine.cache_snapshot() if kind == "cache" else {"error": f"unknown query {kind!r}"}
        except Exception as exc:  # a question must always get an answer
            log.exception("query %s failed", kind)
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        events.put(("answer", query_id, answer))


def _fail(events, job_id: str, err: SDError) -> None:
    events.put(("failed", job_id, err.to_dict()))
