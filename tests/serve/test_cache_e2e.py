"""Checkpoint switches through the worker's model cache: RAM hits read no file, LRU eviction, GET /cache."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.server import running_server

SD1, SD1_B, SDXL = 3_648_756, 3_648_756, 5_754_140  # bytes of the tiny pipelines in fp32 (checked below)


def _payload(checkpoint: str, seed: int = 7) -> dict:
    return {"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "seed": seed,
            "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": checkpoint}}


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_switch_back_is_served_from_ram_without_reading_the_file(tiny_model_store, tmp_path, monkeypatch):
    """A → B → A in one worker: two file loads, the third job from RAM, pixels equal to A's cold load."""
    from pipelines import checkpoint
    from serve.executor import Engine
    from serve.requests import build_job
    from serve.settings import Settings

    settings = Settings(model_store=str(tiny_model_store), output=str(tmp_path / "out"), cache_dir=tmp_path / "cache",
                        cache_ram_budget="1GiB")
    engine = Engine(settings)
    reads: list[str] = []
    real = checkpoint.load_pipeline

    def counting(path, **kwargs):
        reads.append(Path(path).name)
        return real(path, **kwargs)

    monkeypatch.setattr(checkpoint, "load_pipeline", counting)

    def run(name: str) -> dict:
        return engine.run(build_job(_payload(name), settings), should_abort=lambda: False)

    cold = run("tiny-sd1")
    other = run("tiny-sd1-b")
    warm = run("tiny-sd1")
    assert reads == ["tiny-sd1.safetensors", "tiny-sd1-b.safetensors"]
    assert [r["job"]["cache"]["checkpoint"]["source"] for r in (cold, other, warm)] == ["load", "load", "ram"]
    assert "load" not in warm["job"]["cache"]["checkpoint"]["times"]
    assert (_pixels(warm["images"][0]) == _pixels(cold["images"][0])).all()
    assert not (_pixels(other["images"][0]) == _pixels(cold["images"][0])).all()
    tiers = warm["job"]["cache"]["tiers"]
    assert set(tiers) == {"ram"}  # CPU: RAM is the device memory, one tier
    assert tiers["ram"]["hits"] == 1 and tiers["ram"]["misses"] == 2 and tiers["ram"]["used"] == SD1 + SD1_B
    assert tiers["ram"]["models"] == ["tiny-sd1-b", "tiny-sd1"]  # LRU first
    snap = engine.cache_snapshot()
    assert snap["memory"]["unified"] and snap["disk"] is not None


def test_over_budget_keeps_the_model_in_use(tiny_model_store, tmp_path):
    """A budget smaller than one model: the job still runs, and only its model stays (pinned)."""
    from serve.executor import Engine
    from serve.requests import build_job
    from serve.settings import Settings

    settings = Settings(model_store=str(tiny_model_store), output=str(tmp_path / "out"), cache_dir=tmp_path / "cache",
                        cache_ram_budget="1KiB")
    engine = Engine(settings)
    for name in ("tiny-sd1", "tiny-sd1-b"):
        result = engine.run(build_job(_payload(name), settings), should_abort=lambda: False)
        assert result["images"] and result["job"]["cache"]["checkpoint"]["over_budget"]
    entries = engine.cache_snapshot()["memory"]["tiers"]["ram"]["entries"]
    assert [(e["name"], e["pinned"]) for e in entries] == [("tiny-sd1-b", True)]
    assert result["job"]["cache"]["checkpoint"]["evicted"][0]["name"] == "tiny-sd1"


@pytest.mark.timeout(240)
def test_server_switches_evict_in_lru_order_and_cache_endpoint_shows_tiers(tiny_model_store, tmp_path):
    """Real server, RAM budget for two tiny models: sd1, sd1-b, sd1 (hit), sdxl evicts sd1-b (the LRU one)."""
    budget = SD1 + SDXL + 100_000  # holds sd1 + sdxl, or sd1 + sd1-b, never all three
    with running_server(tiny_model_store, tmp_path, CACHE_RAM_BUDGET=str(budget)) as server:
        empty = httpx.get(server.url + "/cache", timeout=10).json()
        assert empty["memory"]["tiers"]["ram"]["budget"] == budget and empty["memory"]["tiers"]["ram"]["entries"] == []
        jobs = []
        for name in ("tiny-sd1", "tiny-sd1-b", "tiny-sd1", "tiny-sdxl"):
            response = httpx.post(server.url + "/invocations", json=_payload(name), timeout=120)
            assert response.status_code == 200, response.text
            jobs.append(response.json()["job_id"])
        answer = httpx.get(server.url + "/cache", timeout=10)
        assert httpx.get(server.url + "/ping", timeout=2).status_code == 200
        # asked during a generation, the worker answers at once (a thread beside the job)
        with ThreadPoolExecutor(1) as pool:
            long_job = pool.submit(httpx.post, server.url + "/invocations", json={**_payload("tiny-sdxl"), "steps": 150}, timeout=120)
            deadline = time.monotonic() + 30
            while httpx.get(server.url + "/ping", timeout=2).json()["status"] != "busy" and time.monotonic() < deadline:
                time.sleep(0.02)
            start = time.monotonic()
            during = httpx.get(server.url + "/cache", timeout=10)
            took = time.monotonic() - start
            busy = httpx.get(server.url + "/ping", timeout=2).json()["status"]
            assert long_job.result().status_code == 200
    assert during.status_code == 200 and busy == "busy" and took < 1.0, (during.text, busy, took)
    assert answer.status_code == 200
    ram = answer.json()["memory"]["tiers"]["ram"]
    assert [(e["name"], e["pinned"]) for e in ram["entries"]] == [("tiny-sd1", False), ("tiny-sdxl", True)]
    assert (ram["hits"], ram["misses"], ram["evictions"]) == (1, 3, 1)
    assert ram["used"] == SD1 + SDXL <= budget and ram["bytes_evicted"] == SD1_B
    records = [json.loads((server.output / job / "job.json").read_text()) for job in jobs]
    assert [r["cache"]["checkpoint"]["source"] for r in records] == ["load", "load", "ram", "load"]
    assert [e["name"] for e in records[3]["cache"]["checkpoint"]["evicted"]] == ["tiny-sd1-b"]
    assert records[3]["cache"]["checkpoint"]["times"]["load"] > 0
