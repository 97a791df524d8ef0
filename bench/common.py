"""Shared pieces of the benchmarks: the bench model and a noisy-machine check."""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.tiny import write_checkpoint

# The tiny SD1-layout model at this size and 20 steps takes ~1-2 s per image on a
# 2-core CPU: long enough that fixed serving costs show as a ratio, short enough to repeat.
BENCH_SIZE = 256


def write_bench_checkpoint(store: Path) -> Path:
    """A random-weight SD1 single-file checkpoint (+ its config folder) in ``store``'s Stable-diffusion/."""
    return write_checkpoint(store / "Stable-diffusion", "bench-sd1", "sd1", seed=0)


def check_quiet() -> None:
    """Set the offline environment, quiet library logs, and print the load average
    (these machines are shared, and a busy core skews every number)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    load1, _, _ = os.getloadavg()
    note = "  (busy: numbers will be noisy)" if load1 > 0.5 else ""
    print(f"load average {load1:.2f} on {os.cpu_count()} cores{note}")


def write_full_sd15(path: Path) -> Path:
    """A full-size SD1.5-shaped random-weight single file (fp16, ~2 GB, no sidecar: loads via the bundled config)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import container
    from pipelines.ldm_export import export_state_dict, save_single_file

    folder = Path(container.__file__).parent / "configs" / "sd15"
    torch.manual_seed(0)
    with torch.no_grad():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    state = {k: v.to(torch.float16) for k, v in export_state_dict("sd1", unet, vae, text_encoder).items()}
    del unet, vae, text_encoder
    return save_single_file(path, state)
