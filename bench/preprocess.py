"""ControlNet preprocessor cost: first use (load the annotator + detect) vs cached (detect only).

Random-weight annotator files of the real architectures (tests/support/annotator_files.py,
fp32 as published, ~1.6 GB cached under ~/.cache), dropped from the page cache before each first
use so "first" includes reading the file. A 512×512 picture at processor_res 512 (A1111's
default), fp32 on the CPU. Each module gets a fresh :class:`Preprocessors`, so a module
that shares a network with an earlier one (openpose_full after openpose) still pays its load.

Caveat: random OpenPose networks find no person, so the hand and face networks never
run on a crop; a real photo costs more per call for openpose_hand/face/full.

    python -m bench.preprocess [--modules canny openpose depth_midas] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import numpy as np
from PIL import Image, ImageDraw

from bench.common import check_quiet
from pipelines.preprocess import Preprocessors, known_modules, weight_files
from tests.support.annotator_files import cached_annotators_dir

DEFAULT_MODULES = ["canny", "openpose", "openpose_full", "depth_midas", "softedge_hed", "mlsd",
                   "lineart_realistic", "lineart_anime", "normal_bae", "shuffle"]


def picture(size: int = 512) -> Image.Image:
    """A picture with gradients, shapes and straight lines."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([np.broadcast_to(ramp, (size, size)), np.broadcast_to(ramp[:, None], (size, size)),
                       np.full((size, size), 90.0)], axis=2).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.rectangle((60, 50, 260, 300), fill=(250, 250, 250))
    draw.line((20, 480, 490, 30), fill=(0, 0, 0), width=6)
    draw.ellipse((300, 100, 470, 400), fill=(20, 40, 200))
    return image


def drop_from_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(call) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``call()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", default=DEFAULT_MODULES, choices=known_modules())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--res", type=int, default=512)
    args = parser.parse_args()
    check_quiet()
    image = picture()
    started = time.perf_counter()
    Preprocessors(None).run("canny", image, processor_res=64)  # pays the one-off controlnet-aux import
    print(f"controlnet-aux import + first canny: {time.perf_counter() - started:.2f}s (once per worker process)")
    folder = cached_annotators_dir("float32")
    print("wall seconds (CPU seconds of this process in brackets: less sensitive to a busy machine)")
    print(f"{'module':18s} {'load':>13s} {'first use':>15s} {'cached':>15s} {'first/cached':>12s}")
    for module in args.modules:
        for file_name in weight_files(module):
            drop_from_page_cache(folder / file_name)
        pre = Preprocessors(folder)
        call = functools.partial(pre.run, module, image, processor_res=args.res, seed=0)
        first, first_cpu = timed(call)
        load = sum(pre.load_seconds.values())
        runs = [timed(call) for _ in range(args.repeats)]
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"{module:18s} {load:13.2f} {first:7.2f} ({first_cpu:5.2f}) {wall:7.3f} ({cpu:5.2f}) {first / max(wall, 1e-6):12.1f}")


if __name__ == "__main__":
    main()
