"""End-to-end `/invocations` latency ÷ a direct diffusers call on the same warm model.

Both sides use the same single-file checkpoint (a random-weight SD1-layout model
sized so one generation takes ~1-2 s on a 2-core CPU), the same parameters and
seeds; calls alternate A, B, A, B so machine noise hits both alike. Prints the
medians and their ratio (target <= 1.03).

    python -m bench.serving_overhead [--rounds 7] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.common import BENCH_SIZE, check_quiet, write_bench_checkpoint
from pipelines.checkpoint import load_pipeline
from tests.support.server import ServerProcess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    check_quiet()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "models"
        ckpt = write_bench_checkpoint(store)
        payload = {
            "prompt": "a lighthouse on a cliff at dusk",
            "negative_prompt": "blurry",
            "steps": args.steps,
            "width": BENCH_SIZE,
            "height": BENCH_SIZE,
            "cfg_scale": 7,
            "seed": 1234,
            "sampler_name": "Euler",
        }
        server = ServerProcess(
            {"MODEL_STORE": str(store), "OUTPUT": str(Path(tmp) / "out"), "CACHE_DIR": str(Path(tmp) / "cache"), "LOG_LEVEL": "warning"},
            log_path=Path(tmp) / "server.log",
        ).start()
        try:
            loaded = load_pipeline(ckpt, device="cpu", dtype=torch.float32)
            pipe = loaded.pipe
            from diffusers import EulerDiscreteScheduler

            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)

            def direct() -> float:
                start = time.perf_counter()
                pipe(
                    prompt=payload["prompt"],
                    negative_prompt=payload["negative_prompt"],
                    num_inference_steps=args.steps,
                    guidance_scale=7,
                    width=BENCH_SIZE,
                    height=BENCH_SIZE,
                    generator=torch.Generator("cpu").manual_seed(1234),
                )
                return time.perf_counter() - start

            def served() -> float:
                start = time.perf_counter()
                r = httpx.post(server.url + "/invocations", content=json.dumps(payload), headers={"Content-Type": "application/json"}, timeout=300)
                elapsed = time.perf_counter() - start
                r.raise_for_status()
                return elapsed

            served(), direct()  # warm both: load, first-call allocations
            a, b = [], []
            for _ in range(args.rounds):
                a.append(served())
                b.append(direct())
        finally:
            server.stop()
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"model: random-weight SD1 layout {BENCH_SIZE}x{BENCH_SIZE}, {args.steps} steps, Euler, fp32 CPU, {args.rounds} rounds")
    print(f"served /invocations  median {ma:.3f} s  (all: {', '.join(f'{x:.3f}' for x in a)})")
    print(f"direct diffusers     median {mb:.3f} s  (all: {', '.join(f'{x:.3f}' for x in b)})")
    print(f"ratio served/direct  {ma / mb:.3f}  (target <= 1.03)")


if __name__ == "__main__":
    main()
