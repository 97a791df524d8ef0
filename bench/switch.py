"""Checkpoint switch A → B → A with both cached in RAM, against a cold ``from_single_file`` load.

Two full-size SD1.5-shaped random-weight single files (fp16 on disk, fp32 in
memory on the CPU; B is a copy of A under another name, so the store holds two
checkpoints and our cache shares their identical VAE) in a local model store,
served by the worker's own :class:`serve.executor.Engine`. Measured in one run:

* cold: raw diffusers ``StableDiffusionPipeline.from_single_file`` of A with
  the file dropped from the page cache first (``POSIX_FADV_DONTNEED``),
* switch: what a job pays to get the other checkpoint ready when both sit in
  the RAM tier (``Engine._activate`` + the job's extra-network preparation).

Prints medians and switch ÷ cold (target ≤ 0.02 with cold ≥ 2 s). Needs ~14 GB of RAM.

    python -m bench.switch [--switches 10] [--cold 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def drop_page_cache(path: Path) -> None:
    """Make the next read of ``path`` come from the disk (a cold load)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_cold_load(path: Path) -> float:
    """Seconds for diffusers' own ``from_single_file`` (bundled SD1.5 config, fp32, offline) from a cold file."""
    import torch
    from diffusers import StableDiffusionPipeline

    import container

    config = Path(container.__file__).parent / "configs" / "sd15"
    drop_page_cache(path)
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    torch_dtype=torch.float32, safety_checker=None,
                                                    requires_safety_checker=False)
    elapsed = time.perf_counter() - start
    del pipe
    from pipelines.memory import release_memory

    release_memory()
    return elapsed


def make_store(root: Path, names: list[str]) -> Path:
    """A local A1111 models folder with one full-size SD1.5-shaped file under each of ``names``."""
    from bench.common import write_full_sd15

    for kind in ("Stable-diffusion", "Lora", "hypernetworks", "embeddings", "VAE"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    first = write_full_sd15(root / "Stable-diffusion" / f"{names[0]}.safetensors")
    for name in names[1:]:
        shutil.copyfile(first, root / "Stable-diffusion" / f"{name}.safetensors")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--cold", type=int, default=2)
    args = parser.parse_args()
    from bench.common import check_quiet

    check_quiet()
    from serve.executor import Engine
    from serve.requests import build_job
    from serve.settings import Settings

    with tempfile.TemporaryDirectory(prefix="bench-switch-") as tmp:
        t0 = time.perf_counter()
        store = make_store(Path(tmp) / "models", ["sd15-a", "sd15-b"])
        print(f"two full-size SD1.5-shaped files written in {time.perf_counter() - t0:.0f} s "
              f"({(store / 'Stable-diffusion' / 'sd15-a.safetensors').stat().st_size / 2**30:.2f} GiB each)")
        cold = [raw_cold_load(store / "Stable-diffusion" / "sd15-a.safetensors") for _ in range(args.cold)]
        settings = Settings(model_store=str(store), output=str(Path(tmp) / "out"), cache_dir=Path(tmp) / "cache",
                            cache_ram_budget="12GiB")
        engine = Engine(settings)
        jobs = {name: build_job({"prompt": "a cat", "steps": 2, "width": 64, "height": 64,
                                 "override_settings": {"sd_model_checkpoint": name}}, settings)
                for name in ("sd15-a", "sd15-b")}

        def activate(name: str) -> tuple[float, str]:
            start = time.perf_counter()
            ref, path = engine._fetch(name)
            active = engine._activate(ref, path)
            active.extras.prepare(jobs[name].params)
            return time.perf_counter() - start, engine.last_cache.source

        first = [activate("sd15-a"), activate("sd15-b")]  # both read once (then cached in RAM)
        switches = [activate("sd15-a" if i % 2 == 0 else "sd15-b") for i in range(args.switches)]
        snap = engine.cache_snapshot()["memory"]
        engine._release()
    sources = {s for _, s in switches}
    switch = statistics.median(t for t, _ in switches)
    cold_s = statistics.median(cold)
    print(f"cold from_single_file (page cache dropped)  median {cold_s:.2f} s  {[round(c, 2) for c in cold]}")
    print(f"first loads through the engine             {[round(t, 2) for t, _ in first]} s (sha256 beside the load)")
    print(f"switch A<->B, both in RAM ({'/'.join(sorted(sources))} hits)  median {switch * 1000:.1f} ms  "
          f"max {max(t for t, _ in switches) * 1000:.1f} ms over {len(switches)}")
    print(f"RAM tier: {snap['tiers']['ram']['used'] / 2**30:.2f} GiB held, {snap['shared_bytes_saved'] / 2**20:.0f} MiB saved by sharing the identical VAE")
    print(f"switch / cold load  {switch / cold_s:.4f}  (target <= 0.02, cold >= 2 s: {'yes' if cold_s >= 2 else 'NO'})")


if __name__ == "__main__":
    main()
