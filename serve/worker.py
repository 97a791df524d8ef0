"""The HTTP process's handle on the worker process that owns torch.

One spawned child runs jobs one at a time (``serve.child``). This side admits
jobs into a bounded queue, tracks the worker's state for ``/ping`` from the
events the child sends, resolves each job's future when its result arrives,
and fails everything in flight if the child dies. No torch here.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import queue
import threading
import time
from concurrent.futures import Future
from enum import Enum
from typing import Any

from pipelines.errors import GenerationFailed, from_dict
from serve.errors import JobConflict, NotAccepting, QueueFull
from serve.requests import Job
from serve.settings import Settings

log = logging.getLogger(__name__)



class WorkerState(str, Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"
    DEFUNCT = "defunct"


class WorkerHandle:
    """Spawn the worker, hand it jobs, and follow its state."""

    def __init__(self, settings: Settings):
        self._settings = settings
        ctx = mp.get_context("spawn")
        self._jobs: mp.Queue = ctx.Queue()
        self._events: mp.Queue = ctx.Queue()
        self._draining = ctx.Event()
        self._abort = ctx.Event()
        self._queries: mp.Queue = ctx.Queue()  # ("cache", query_id): answered beside a running job
        self._proc = ctx.Process(
            target=_child_entry,
            args=(settings.worker_view(), self._jobs, self._events, self._draining, self._abort, self._queries),
            name="sd-worker",
            daemon=True,
        )
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        self._jobs_by_id: dict[str, Job] = {}
        self._answers: dict[int, Future] = {}  # query id → future of the child's answer
        self._query_ids = itertools.count(1)
        self._running: str | None = None
        self._progress = 0.0
        self._state = WorkerState.STARTING
        self._reason = ""
        self._started_at = 0.0
        self.info: dict[str, Any] = {}
        self._reader = threading.Thread(target=self._read_events, name="sd-worker-events", daemon=True)

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        self._started_at = time.monotonic()
        self._proc.start()
        self._reader.start()

    @property
    def state(self) -> WorkerState:
        with self._lock:
            if self._state == WorkerState.STARTING and time.monotonic() - self._started_at > self._settings.worker_start_timeout:
                self._set_defunct_locked(f"worker not ready after {self._settings.worker_start_timeout:.0f} s")
            return self._state

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def running_job(self) -> str | None:
        return self._running

    @property
    def progress(self) -> float:
        """Fraction of the running job's denoising steps done."""
        return self._progress

    def output_of(self, job_id: str) -> str | None:
        """The output location of a job queued or running here (None if it is not)."""
        with self._lock:
            job = self._jobs_by_id.get(job_id)
        if job is None:
            return None
        return job.output.uri or self._settings.output

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._futures)

    def begin_shutdown(self, grace: float) -> None:
        """Stop taking work; let the running job finish for ``grace`` s, then cancel it and stop the child."""
        with self._lock:
            if self._state in (WorkerState.STOPPING, WorkerState.DEFUNCT):
                return
            self._state = WorkerState.STOPPING
        log.info("shutting down: %d job(s) in flight, grace %.0f s", self.pending, grace)
        self._draining.set()
        self._jobs.put(None)
        threading.Thread(target=self._stop_after, args=(grace,), name="sd-worker-stop", daemon=True).start()

    def _stop_after(self, grace: float) -> None:
        self._proc.join(grace)
        if self._proc.is_alive():
            log.warning("job %s still running after %.0f s: cancelling it", self._running, grace)
            self._abort.set()
            self._proc.join(3.0)
        if self._proc.is_alive():
            log.error("worker did not stop: killing it")
            self._proc.kill()
            self._proc.join(2.0)

    def join(self, timeout: float) -> bool:
        self._proc.join(timeout)
        return not self._proc.is_alive()

    # -- jobs -------------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future resolves to the worker's result dict or raises an :class:`SDError`."""
        with self._lock:
            if self._state not in (WorkerState.READY, WorkerState.BUSY):
                raise NotAccepting(self._state.value)
            # queue_size jobs may wait while one runs
            if len(self._futures) >= self._settings.queue_size + 1:
                raise QueueFull()
            if job.job_id in self._futures:
                raise JobConflict(job.job_id)
            future: Future = Future()
            self._futures[job.job_id] = future
            self._jobs_by_id[job.job_id] = job
        self._jobs.put(job)
        return future

    # -- questions to the child ---------------------------------------------------------
    def ask_cache(self) -> Future:
        """What the worker holds in each cache tier; the future resolves to a dict (answered even mid-job)."""
        with self._lock:
            if self._state not in (WorkerState.READY, WorkerState.BUSY):
                raise NotAccepting(self._state.value)
            query_id = next(self._query_ids)
            future: Future = Future()
            self._answers[query_id] = future
        future.add_done_callback(lambda _f: self._forget_answer(query_id))
        self._queries.put(("cache", query_id))
        return future

    def _forget_answer(self, query_id: int) -> None:
        with self._lock:
            self._answers.pop(query_id, None)

    # -- events from the child ----------------------------------------------------------
    def _read_events(self) -> None:
        while True:
            try:
                event = self._events.get(timeout=0.2)
            except queue.Empty:
                if not self._proc.is_alive() and self._proc.exitcode is not None:
                    self._on_exit()
                    return
                continue
            except (EOFError, OSError):
                self._on_exit()
                return
            self._dispatch(event)

    def _dispatch(self, event: tuple) -> None:
        kind = event[0]
        if kind == "answer":
            with self._lock:
                future = self._answers.pop(event[1], None)
            if future is not None and not future.done():
                future.set_result(event[2])  # outside the lock: done-callbacks may take it
            return
        with self._lock:
            if kind == "ready":
                self.info = event[1]
                if self._state == WorkerState.STARTING:
                    self._state = WorkerState.READY
                log.info("worker ready: %s", event[1])
            elif kind == "fatal":
                self._set_defunct_locked(event[1])
            elif kind == "progress":
                if event[1] == self._running:
                    self._progress = event[2]
            elif kind == "started":
                self._running = event[1]
                self._progress = 0.0
                if self._state == WorkerState.READY:
                    self._state = WorkerState.BUSY
            elif kind in ("done", "failed"):
                job_id = event[1]
                self._running = None
                if self._state == WorkerState.BUSY:
                    self._state = WorkerState.READY
                future = self._futures.pop(job_id, None)
                self._jobs_by_id.pop(job_id, None)
                if future is not None:
                    if kind == "done":
                        future.set_result(event[2])
                    else:
                        future.set_exception(from_dict(event[2]))

    def _on_exit(self) -> None:
        code = self._proc.exitcode
        with self._lock:
            stopping = self._state == WorkerState.STOPPING
            if not stopping:
                self._set_defunct_locked(f"worker process exited with code {code}")
            reason = "the server shut down before the job finished" if stopping else f"worker process died (exit code {code})"
            answers = list(self._answers.values())
            orphans = list(self._futures.items())
            jobs = dict(self._jobs_by_id)
            self._futures.clear()
            self._jobs_by_id.clear()
            running = self._running
            self._running = None
        for answer in answers:
            if not answer.done():
                answer.set_exception(GenerationFailed(reason))
        # the record first, then the answer: a client that reads job.json after its
        # response must find the failure there
        for job_id, future in orphans:
            if job_id == running or stopping:
                _record_orphan(self._settings, jobs.get(job_id), f"interrupted: {reason}")
            future.set_exception(GenerationFailed(reason))

    def _set_defunct_locked(self, reason: str) -> None:
        if self._state != WorkerState.DEFUNCT:
            log.error("worker defunct: %s", reason)
        self._state = WorkerState.DEFUNCT
        self._reason = reason


def _record_orphan(settings: Settings, job: Job | None, reason: str) -> None:
    """The child died mid-job and could not write its own record: mark the job failed."""
    if job is None:
        return
    try:
        from serve.records import fail_record_from_outside

        fail_record_from_outside(settings, job, reason)
    except Exception:  # the record is best effort; the HTTP answer already says failed
        log.exception("could not record job %s as failed", job.job_id)


def _child_entry(settings: dict, jobs, events, draining, abort, queries) -> None:
    # imported here: the child is a fresh interpreter (spawn), and this keeps torch
    # out of the HTTP process
    from serve.child import run_worker

    run_worker(settings, jobs, events, draining, abort, queries)
