"""Start-up and health latency of `serve`.

Measures, in one run: time from process start to the port accepting TCP
connections, to the first `/ping` 200 (worker ready), and `/ping` latency
(p50/p99/max) while a generation runs. SageMaker wants connections within
250 ms and a ping answer within 2 s; our target is p99 <= 50 ms.

    python -m bench.startup [--pings 200]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import BENCH_SIZE, check_quiet, write_bench_checkpoint
from tests.support.server import ServerProcess


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.05):
            return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=200)
    args = parser.parse_args()
    check_quiet()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "models"
        write_bench_checkpoint(store)
        server = ServerProcess(
            {"MODEL_STORE": str(store), "OUTPUT": str(Path(tmp) / "out"), "CACHE_DIR": str(Path(tmp) / "cache"), "LOG_LEVEL": "warning"},
            log_path=Path(tmp) / "server.log",
        )
        t0 = time.perf_counter()
        server.start(wait_ready=False)
        try:
            while not _port_open(server.port):
                time.sleep(0.005)
            t_port = time.perf_counter() - t0
            with httpx.Client(base_url=server.url, timeout=5) as client:
                while True:
                    try:
                        if client.get("/ping").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.01)
                t_ready = time.perf_counter() - t0
                payload = {"prompt": "x", "steps": 40, "width": BENCH_SIZE, "height": BENCH_SIZE, "seed": 1, "batch_size": 2}
                done = threading.Event()

                def generate():
                    httpx.post(server.url + "/invocations", content=json.dumps(payload), headers={"Content-Type": "application/json"}, timeout=600)
                    done.set()

                worker = threading.Thread(target=generate)
                worker.start()
                time.sleep(0.5)  # let the job start
                lat, busy = [], 0
                while not done.is_set() and len(lat) < args.pings:
                    start = time.perf_counter()
                    r = client.get("/ping")
                    lat.append((time.perf_counter() - start) * 1000)
                    busy += r.json().get("status") == "busy"
                    time.sleep(0.01)
                worker.join()
        finally:
            server.stop()
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(f"port accepting connections  {t_port * 1000:.0f} ms after start (SageMaker: 250 ms)")
    print(f"/ping 200 (worker ready)    {t_ready:.2f} s after start")
    print(f"/ping during generation     n={len(lat)} ({busy} answered 'busy'), p50 {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms, max {lat[-1]:.1f} ms (target p99 <= 50 ms)")


if __name__ == "__main__":
    main()
