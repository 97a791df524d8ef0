"""Server lifecycle under stress: full queue, SIGTERM mid-job, a dead worker, bad model files."""

import json
import pickle
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.model_fixtures import copy_checkpoint
from tests.support.server import ServerProcess

SMALL = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1}
SLOW = {"prompt": "x", "steps": 150, "width": 256, "height": 256, "batch_size": 2, "seed": 1}


def make_store(tiny_model_store: Path, root: Path) -> Path:
    copy_checkpoint(tiny_model_store, "tiny-sd1", root / "Stable-diffusion")
    return root


def start(store: Path, tmp: Path, **env) -> ServerProcess:
    out = tmp / "out"
    proc = ServerProcess(
        {"MODEL_STORE": str(store), "OUTPUT": str(out), "CACHE_DIR": str(tmp / "cache"), "DEFAULT_CHECKPOINT": "tiny-sd1", **env},
        log_path=tmp / "server.log",
    ).start()
    proc.output = out
    return proc


def post_async(url: str, body: dict, results: list, **extra) -> threading.Thread:
    def run():
        try:
            results.append(httpx.post(url + "/invocations", json={**body, **extra}, timeout=120))
        except httpx.HTTPError as exc:
            results.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t


def wait_status(proc: ServerProcess, status: str, timeout: float = 60, generating: bool = False) -> None:
    """Wait for /ping to say ``status`` (and, with ``generating``, for denoising to have begun)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = httpx.get(proc.url + "/ping", timeout=2).json()
            if body["status"] == status and (not generating or body["progress"] > 0):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"never saw /ping status {status}")


def worker_pid(proc: ServerProcess) -> int:
    for child in psutil.Process(proc.proc.pid).children():
        cmd = " ".join(child.cmdline())
        if "multiprocessing" in cmd and "resource_tracker" not in cmd:
            return child.pid
    raise AssertionError("no worker child found")


@pytest.fixture
def store(tiny_model_store, tmp_path):
    return make_store(tiny_model_store, tmp_path / "models")


def test_queue_full_is_503_with_retry_after(store, tmp_path):
    proc = start(store, tmp_path, QUEUE_SIZE="1")
    try:
        results: list = []
        threads = [post_async(proc.url, {**SLOW, "steps": 30}, results, seed=i) for i in range(4)]
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) == 2 and codes.count(503) == 2, codes
        full = next(r for r in results if r.status_code == 503)
        assert full.headers["Retry-After"] and full.json()["error"] == "queue_full"
    finally:
        proc.stop()


def test_sigterm_cancels_a_long_job_records_it_and_exits_in_time(store, tmp_path):
    proc = start(store, tmp_path, SHUTDOWN_GRACE="2")
    try:
        body = {"id": "long-job", "payload": {**SLOW, "n_iter": 8}}
        results = []
        t = threading.Thread(target=lambda: results.append(httpx.post(proc.url + "/invocations", json=body, timeout=120)))
        t.start()
        wait_status(proc, "busy", generating=True)
        start_t = time.monotonic()
        proc.terminate()
        code = proc.proc.wait(30)
        elapsed = time.monotonic() - start_t
        t.join(10)
        assert elapsed < 25, elapsed
        assert code == 0, proc.log_tail()
        assert "leaked" not in proc.log_tail()
        assert results and results[0].status_code == 503, results
        record = json.loads((proc.output / "long-job" / "job.json").read_text())
        assert record["status"] == "failed" and "shutting down" in record["error"], record
        assert not (proc.output / "long-job" / "params.json").exists()
    finally:
        proc.stop()


def test_sigterm_lets_a_short_job_finish(store, tmp_path):
    proc = start(store, tmp_path, SHUTDOWN_GRACE="25")
    try:
        results: list = []
        # short next to the grace period even on a loaded machine
        body = {"id": "short-job", "payload": {**SLOW, "steps": 8, "width": 128, "height": 128, "batch_size": 1}}
        t = threading.Thread(target=lambda: results.append(httpx.post(proc.url + "/invocations", json=body, timeout=120)))
        t.start()
        wait_status(proc, "busy")
        proc.terminate()
        proc.proc.wait(40)
        t.join(10)
        assert results[0].status_code == 200
        assert json.loads((proc.output / "short-job" / "job.json").read_text())["status"] == "succeed"
    finally:
        proc.stop()


def test_dead_worker_fails_the_job_and_ping(store, tmp_path):
    proc = start(store, tmp_path)
    try:
        results: list = []
        body = {"id": "doomed", "payload": {**SLOW, "n_iter": 8}}
        t = threading.Thread(target=lambda: results.append(httpx.post(proc.url + "/invocations", json=body, timeout=120)))
        t.start()
        wait_status(proc, "busy")
        psutil.Process(worker_pid(proc)).kill()
        t.join(30)
        assert results[0].status_code == 500 and "worker process died" in results[0].json()["detail"]
        ping = httpx.get(proc.url + "/ping", timeout=2)
        assert ping.status_code == 503 and ping.json()["status"] == "defunct"
        record = json.loads((proc.output / "doomed" / "job.json").read_text())
        assert record["status"] == "failed" and "died" in record["error"]
        r = httpx.post(proc.url + "/invocations", json=SMALL, timeout=10)
        assert r.status_code == 503 and r.headers["Retry-After"]
    finally:
        proc.stop()


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/sd-endpoint-pwned",))


def test_bad_model_files_are_rejected_with_their_name(store, tmp_path):
    sd = store / "Stable-diffusion"
    good = (sd / "tiny-sd1.safetensors").read_bytes()
    (sd / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (sd / "garbage.safetensors").write_bytes(b"\x00" * 64)
    marker = Path("/tmp/sd-endpoint-pwned")
    marker.unlink(missing_ok=True)
    with open(sd / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": _Boom()}, f)
    proc = start(store, tmp_path)
    try:
        for name in ("truncated", "garbage", "evil"):
            r = httpx.post(proc.url + "/invocations", json={**SMALL, "override_settings": {"sd_model_checkpoint": name}}, timeout=60)
            assert r.status_code == 422, r.text
            assert name in r.json()["detail"]
            record = json.loads((proc.output / r.json()["job_id"] / "job.json").read_text())
            assert record["status"] == "failed"
        assert not marker.exists()
        assert httpx.post(proc.url + "/invocations", json=SMALL, timeout=60).status_code == 200
    finally:
        proc.stop()


def test_ping_is_503_while_starting_then_200(store, tmp_path):
    proc = ServerProcess({"MODEL_STORE": str(store), "OUTPUT": str(tmp_path / "out"), "CACHE_DIR": str(tmp_path / "c")}, log_path=tmp_path / "log")
    proc.start(wait_ready=False)
    try:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = httpx.get(proc.url + "/ping", timeout=2)
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            seen.append((r.status_code, r.json()["status"]))
            if r.status_code == 200:
                break
            time.sleep(0.02)
        assert seen[0] == (503, "starting"), seen[:3]
        assert seen[-1] == (200, "ready")
        r = httpx.post(proc.url + "/invocations", json=SMALL, timeout=60)
        assert r.status_code == 200
    finally:
        proc.stop()


def test_worker_that_cannot_start_makes_ping_fail_with_the_reason(tmp_path):
    proc = ServerProcess({"MODEL_STORE": "ftp://nowhere/models", "OUTPUT": str(tmp_path / "out")}, log_path=tmp_path / "log")
    proc.start(wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        body = {}
        while time.monotonic() < deadline:
            try:
                r = httpx.get(proc.url + "/ping", timeout=2)
                body = r.json()
                if body["status"] == "defunct":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert r.status_code == 503 and body["status"] == "defunct"
        assert "ftp://nowhere/models" in body["reason"]
        r = httpx.post(proc.url + "/invocations", json=SMALL, timeout=10)
        assert r.status_code == 503
    finally:
        proc.stop()
