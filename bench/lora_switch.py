"""Cost of changing the LoRA set between requests, and memory drift over many switches.

Full-size SD1.5-shaped random-weight model (the bundled config, fp32 on CPU),
four rank-16 kohya LoRAs over every attention/MLP layer of UNet and text
encoder. Measured in one run, alternating:

* generation with the same LoRA set as the previous request (warm baseline),
* generation right after switching to another cached set (``apply`` + generate),
* the first ``apply`` of a never-seen file (load from disk, map keys, inject),
* process RSS before and after 100 alternating sets.

Prints medians and the ratios the issue asks for: added switch latency ÷ one
generation (target <= 0.05) and RSS drift (target <= 1 %).

    python -m bench.lora_switch [--switches 100]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch

from bench.common import check_quiet, write_full_sd15
from pipelines.checkpoint import load_pipeline
from pipelines.lora import LoraFile, LoraManager
from tests.support.lora_files import write_kohya_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    check_quiet()
    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ckpt = write_full_sd15(tmp / "sd15-random.safetensors")
        loaded = load_pipeline(ckpt, device="cpu", dtype=torch.float32)
        pipe = loaded.pipe
        print(f"model written and loaded in {time.perf_counter() - t0:.1f} s")
        files = []
        for i in range(5):
            path = write_kohya_lora(tmp / f"lora{i}.safetensors", pipe, "sd1", seed=i, rank=16, magnitude=0.05)
            files.append(LoraFile(path=path, sha256=f"{i:064x}", name=f"lora{i}", te_weight=0.8, unet_weight=0.8))
        print(f"LoRA file size {files[0].path.stat().st_size / 2**20:.1f} MiB each")
        manager = LoraManager(pipe, "sd1", max_adapters=8)
        sets = [[files[0]], [files[1]], [files[0], files[2]], [files[3]]]

        def generate() -> float:
            start = time.perf_counter()
            pipe(prompt="a photo of a cat", num_inference_steps=1, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(1), output_type="np")
            return time.perf_counter() - start

        for s in sets:  # warm: every set's files loaded once
            manager.apply(s)
            generate()
        same, switched, apply_cached = [], [], []
        for r in range(args.rounds):
            manager.apply(sets[r % 4])
            same.append(generate())  # same set as the line above: no change
            start = time.perf_counter()
            manager.apply(sets[(r + 1) % 4])
            apply_cached.append(time.perf_counter() - start)
            switched.append(apply_cached[-1] + generate())
        start = time.perf_counter()
        manager.apply([files[4]])
        first_load = time.perf_counter() - start

        gc.collect()
        rss_before = proc.memory_info().rss
        for i in range(args.switches):
            manager.apply(sets[i % 4])
            generate()
        gc.collect()
        rss_after = proc.memory_info().rss
    gen = statistics.median(same)
    added = statistics.median(switched) - gen
    print(f"generation, same LoRA set        median {gen:.3f} s  (1 step, 64x64, fp32 CPU)")
    print(f"generation after a set switch    median {statistics.median(switched):.3f} s  (apply alone {statistics.median(apply_cached) * 1000:.1f} ms)")
    print(f"first load of a new LoRA file    {first_load:.3f} s")
    print(f"added switch latency / generation  {max(added, 0.0) / gen:.3f}  (apply alone / generation {statistics.median(apply_cached) / gen:.3f}; target <= 0.05)")
    print(f"RSS over {args.switches} alternating sets: {rss_before / 2**20:.0f} MiB -> {rss_after / 2**20:.0f} MiB, drift {100 * (rss_after - rss_before) / rss_before:+.2f} %  (target <= 1 %)")


if __name__ == "__main__":
    main()
