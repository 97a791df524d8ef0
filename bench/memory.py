"""Process RSS over many requests cycling checkpoints under budgets that force eviction.

Four medium SD1-layout random-weight checkpoints (``--width 64``: UNet
64/128/256/256 with 2 layers per block, VAE 64/128/256/256, a 6-layer CLIP of
width 256: ~60 M parameters, ~240 MB in fp32 each) cycle A B C D A B … for
``--requests`` 64×64 2-step generations through the worker's pipeline cache
(the same class the server uses) with a RAM budget of ``--keep`` checkpoints,
so every request of a cycle evicts and reloads (LRU on a cyclic pattern).

Prints peak RSS against budget + working set, and the drift of RSS between the
end of cycle 2 and cycle 10 (target ≤ 1 %).

    python -m bench.memory [--requests 200] [--width 64 (a multiple of 32)] [--steps 2] [--keep 2]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

NAMES = ("mem-a", "mem-b", "mem-c", "mem-d")


def write_sized_sd1(folder: Path, stem: str, *, width: int = 64, text_width: int = 256, seed: int = 0) -> Path:
    """An SD1-layout single file (+ ``<stem>.config/``) whose UNet/VAE widths scale with ``width`` (SD1.5 is 320)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.ldm_export import export_state_dict, save_single_file
    from pipelines.tiny import build_tiny_components, save_config_folder
    parts = build_tiny_components("sd1", seed)
    w = width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(w, 2 * w, 4 * w, 4 * w), layers_per_block=2, cross_attention_dim=text_width,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=8, sample_size=32,
        ).eval()
        vae = AutoencoderKL(
            block_out_channels=(w, 2 * w, 4 * w, 4 * w), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=64,
        ).eval()
        vocab = parts["tokenizer"].get_vocab()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=6,
            num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
        )).eval()
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=parts["tokenizer"],
                                   scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder.mkdir(parents=True, exist_ok=True)
    save_config_folder(pipe, folder / f"{stem}.config")
    state = {k: v.to(torch.float16) for k, v in export_state_dict("sd1", unet, vae, text_encoder).items()}
    return save_single_file(folder / f"{stem}.safetensors", state)


class _Peak:
    """Samples RSS every 20 ms in a thread: the peak between two reads."""

    def __init__(self):
        from pipelines.memory import rss_bytes

        self._rss, self.peak, self._stop = rss_bytes, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--keep", type=int, default=2, help="checkpoints the RAM budget holds (< 4 forces eviction)")
    args = parser.parse_args()
    from bench.common import check_quiet

    check_quiet()
    import torch

    from pipelines.checkpoint import load_pipeline
    from pipelines.memory import module_bytes, pipeline_modules, rss_bytes
    from pipelines.residency import PipelineCache

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        paths = [write_sized_sd1(Path(tmp), name, width=args.width, seed=i) for i, name in enumerate(NAMES)]
        probe = load_pipeline(paths[0])
        one = sum(module_bytes(m) for m in pipeline_modules(probe.pipe))
        del probe
        budget = args.keep * one + one // 2  # room for `keep` checkpoints, not `keep + 1`
        print(f"4 checkpoints of {one / 2**20:.0f} MiB (fp32; file {paths[0].stat().st_size / 2**20:.0f} MiB, width {args.width}); "
              f"RAM budget {budget / 2**20:.0f} MiB (holds {args.keep})")
        cache = PipelineCache(device="cpu", ram_budget=budget, vram_budget=None, modules_of=lambda lc: pipeline_modules(lc.pipe))

        def request(i: int) -> None:
            path = paths[i % 4]
            loaded, _ = cache.acquire(path.stem, lambda: load_pipeline(path), estimate=one, label=path.stem)
            loaded.pipe(prompt="a photo of a cat", num_inference_steps=args.steps, width=64, height=64,
                        generator=torch.Generator("cpu").manual_seed(i), output_type="np")
            cache.release(path.stem)

        request(0)  # imports, first allocations
        base = rss_bytes()
        by_cycle: dict[int, int] = {}
        start = time.perf_counter()
        with _Peak() as peak:
            for i in range(args.requests):
                request(i)
                if i % 20 == 19:  # a cycle = 20 requests (5 rounds of the 4 checkpoints)
                    by_cycle[(i + 1) // 20] = rss_bytes()
                    print(f"  cycle {(i + 1) // 20}: RSS {by_cycle[(i + 1) // 20] / 2**20:.0f} MiB "
                          f"({time.perf_counter() - start:.0f} s)", flush=True)
        elapsed = time.perf_counter() - start
        snap = cache.snapshot()["tiers"]["ram"]
    working = base  # the process with one checkpoint loaded and run once
    print(f"{args.requests} requests in {elapsed:.0f} s: {snap['misses']} loads, {snap['hits']} hits, {snap['evictions']} evictions")
    print("RSS by cycle (MiB): " + " ".join(f"{c}:{v / 2**20:.0f}" for c, v in sorted(by_cycle.items())))
    limit = budget + working
    print(f"peak RSS {peak.peak / 2**20:.0f} MiB; budget + working set (RSS with one model after its first request) "
          f"{limit / 2**20:.0f} MiB -> {'ok' if peak.peak <= limit else 'OVER'}")
    if 2 in by_cycle and 10 in by_cycle:
        drift = 100 * (by_cycle[10] - by_cycle[2]) / by_cycle[2]
        print(f"RSS drift cycle 2 -> cycle 10: {drift:+.2f} %  (target <= 1 %)")


if __name__ == "__main__":
    main()
