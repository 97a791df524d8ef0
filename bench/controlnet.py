"""Two-unit ControlNet request end to end ÷ the same work done directly with diffusers' MultiControlNet.

Both sides use the same random-weight SD1-layout checkpoint (bench size, Euler), the
same two tiny ControlNets (original single-file layout, loaded from the store's
``ControlNet/`` by the server; from the same files for diffusers), the same input
image and the same per-unit weights and guidance windows:

* served: ``POST /sdapi/v1/txt2img`` with ``alwayson_scripts.controlnet.args`` =
  [canny unit, invert unit], Balanced mode, no detected maps returned;
* direct: canny (OpenCV) and invert done by hand, then
  ``StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=MultiControlNetModel([...]))``.

Calls alternate A, B, A, B; prints medians and their ratio (target <= 1.05), and the
preprocessor cost of one canny run on the same image.

    python -m bench.controlnet [--rounds 5] [--steps 20] [--full-windows]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch
from PIL import Image

from bench.common import BENCH_SIZE, check_quiet, write_bench_checkpoint
from pipelines.checkpoint import load_pipeline
from pipelines.controlnet import load_controlnet
from tests.support.controlnet_files import write_original_controlnet
from tests.support.server import ServerProcess

UNITS = [
    {"module": "canny", "model": "bench-cn-a", "weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0,
     "threshold_a": 100, "threshold_b": 200},
    {"module": "invert", "model": "bench-cn-b", "weight": 0.5, "guidance_start": 0.2, "guidance_end": 0.8},
]


def _input_image() -> Image.Image:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (BENCH_SIZE // 8, BENCH_SIZE // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((BENCH_SIZE, BENCH_SIZE), Image.Resampling.NEAREST)  # blocky: real edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--full-windows", action="store_true",
                        help="both units act at every step (diffusers runs a ControlNet outside its window anyway; we skip it)")
    args = parser.parse_args()
    if args.full_windows:
        for u in UNITS:
            u.update(guidance_start=0.0, guidance_end=1.0)
    check_quiet()
    import cv2
    from diffusers import (
        EulerDiscreteScheduler,
        MultiControlNetModel,
        StableDiffusionControlNetPipeline,
    )

    image = _input_image()
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    image_b64 = base64.b64encode(buf.getvalue()).decode()
    payload = {
        "prompt": "a lighthouse on a cliff at dusk", "negative_prompt": "blurry", "steps": args.steps,
        "width": BENCH_SIZE, "height": BENCH_SIZE, "cfg_scale": 7, "seed": 1234, "sampler_name": "Euler",
        "alwayson_scripts": {"controlnet": {"args": [
            {**u, "image": image_b64, "processor_res": BENCH_SIZE, "save_detected_map": False} for u in UNITS]}},
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "models"
        ckpt = write_bench_checkpoint(store)
        loaded = load_pipeline(ckpt, device="cpu", dtype=torch.float32)
        files = [write_original_controlnet(store / "ControlNet", u["model"], loaded.pipe.unet, seed=i + 1) for i, u in enumerate(UNITS)]
        server = ServerProcess(
            {"MODEL_STORE": str(store), "OUTPUT": str(Path(tmp) / "out"), "CACHE_DIR": str(Path(tmp) / "cache"), "LOG_LEVEL": "warning"},
            log_path=Path(tmp) / "server.log",
        ).start()
        try:
            nets = MultiControlNetModel([load_controlnet(f).model for f in files])
            pipe = StableDiffusionControlNetPipeline.from_pipe(loaded.pipe, controlnet=nets)
            pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)

            def direct() -> float:
                start = time.perf_counter()
                edges = cv2.Canny(np.asarray(image), 100, 200)
                hints = [Image.fromarray(np.stack([edges] * 3, axis=-1)), Image.fromarray(255 - np.asarray(image))]
                pipe(
                    prompt=payload["prompt"], negative_prompt=payload["negative_prompt"], image=hints,
                    controlnet_conditioning_scale=[u["weight"] for u in UNITS],
                    control_guidance_start=[u["guidance_start"] for u in UNITS],
                    control_guidance_end=[u["guidance_end"] for u in UNITS],
                    num_inference_steps=args.steps, guidance_scale=7, width=BENCH_SIZE, height=BENCH_SIZE,
                    generator=torch.Generator("cpu").manual_seed(1234),
                )
                return time.perf_counter() - start

            def served() -> float:
                start = time.perf_counter()
                r = httpx.post(server.url + "/sdapi/v1/txt2img", json=payload, timeout=600)
                elapsed = time.perf_counter() - start
                if r.status_code != 200:
                    raise SystemExit(f"server answered {r.status_code}: {r.text[:500]}")
                return elapsed

            server_procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
            me = psutil.Process()

            def cpu(procs) -> float:
                return sum(sum(p.cpu_times()[:2]) for p in procs)

            served(), direct()  # warm both: model loads, first-call allocations
            a, b, ca, cb = [], [], [], []
            for _ in range(args.rounds):
                before = cpu(server_procs)
                a.append(served())
                ca.append(cpu(server_procs) - before)
                before = cpu([me])
                b.append(direct())
                cb.append(cpu([me]) - before)
        finally:
            server.stop()
    from pipelines.preprocess import Preprocessors

    pre = Preprocessors(None)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        pre.run("canny", image, processor_res=BENCH_SIZE, threshold_a=100, threshold_b=200)
        runs.append(time.perf_counter() - start)
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"model: random-weight SD1 layout {BENCH_SIZE}x{BENCH_SIZE}, {args.steps} steps, Euler, 2 tiny ControlNet units, fp32 CPU, {args.rounds} rounds")
    print(f"served txt2img + 2 units  median {ma:.3f} s  (all: {', '.join(f'{x:.3f}' for x in a)})")
    print(f"direct MultiControlNet    median {mb:.3f} s  (all: {', '.join(f'{x:.3f}' for x in b)})")
    print(f"canny preprocessor        median {statistics.median(runs) * 1000:.1f} ms")
    print(f"CPU seconds per call      served {statistics.median(ca):.2f}, direct {statistics.median(cb):.2f}"
          f"  (ratio {statistics.median(ca) / statistics.median(cb):.3f}; steadier than wall time on a busy machine)")
    print(f"ratio served/direct  {ma / mb:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
