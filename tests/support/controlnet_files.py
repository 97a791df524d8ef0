"""Tiny ControlNets for the tiny test pipelines, written as users download them.

Plain functions (not a pytest plugin): tests import them.  A ControlNet made by
``ControlNetModel.from_unet`` starts with zero convolutions (its residuals are
all zero, so it would change nothing); we re-initialise those from the seed so
every test ControlNet really steers the image.

:func:`write_original_controlnet` writes the original (lllyasviel ``cldm``)
single-file layout — ``control_model.input_blocks.*``, ``input_hint_block.*``,
``zero_convs.*``, ``middle_block_out.*`` — plus a ``<stem>.config/config.json``
(the diffusers config, no weights) so it loads offline like a tiny checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from pipelines.ldm_export import save_single_file, unet_key

PREFIX = "control_model."


def build_tiny_controlnet(unet, seed: int, *, magnitude: float = 0.3):
    """A ControlNet copied from ``unet`` with its zero convs (and hint output conv) drawn from ``seed``."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cn = ControlNetModel.from_unet(unet)
        gen = torch.Generator().manual_seed(seed)
        zero_convs = [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]
        with torch.no_grad():
            for conv in zero_convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * magnitude)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * magnitude * 0.1)
            # the rest of the copied UNet too, so two seeds give two different ControlNets
            for name, p in cn.named_parameters():
                if name.startswith(("down_blocks", "mid_block")) and p.ndim > 1:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return cn.eval()


def _ldm_key(key: str, layers: int) -> str:
    if key.startswith("controlnet_cond_embedding."):
        rest = key.removeprefix("controlnet_cond_embedding.")
        if rest.startswith("conv_in."):
            return "input_hint_block.0." + rest.removeprefix("conv_in.")
        if rest.startswith("conv_out."):
            return "input_hint_block.14." + rest.removeprefix("conv_out.")
        m = re.match(r"blocks\.(\d+)\.(.+)", rest)
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key.removeprefix("controlnet_mid_block.")
    return unet_key(key, layers, set())


def original_state_dict(cn) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel as the original ``control_model.*`` state dict."""
    layers = cn.config.layers_per_block
    return {PREFIX + _ldm_key(k, layers): v.detach().contiguous().clone() for k, v in cn.state_dict().items()}


def write_original_controlnet(folder, stem: str, unet, seed: int, *, suffix: str = ".safetensors", config: bool = True) -> Path:
    """Write ``<folder>/<stem><suffix>`` in the original layout (+ ``<stem>.config/`` unless ``config`` is False)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cn = build_tiny_controlnet(unet, seed)
    state = original_state_dict(cn)
    if config:
        cfg_dir = folder / f"{stem}.config"
        cfg_dir.mkdir(exist_ok=True)
        (cfg_dir / "config.json").write_text(json.dumps(dict(cn.config), indent=1, default=list))
    if suffix == ".safetensors":
        return save_single_file(folder / f"{stem}.safetensors", state)
    path = folder / f"{stem}{suffix}"
    torch.save(state, path)  # A1111's .pth files are bare state dicts
    return path


def write_diffusers_controlnet(folder, unet, seed: int) -> Path:
    """A diffusers ControlNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)."""
    cn = build_tiny_controlnet(unet, seed)
    cn.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def write_pickle_bomb(path) -> Path:
    """A ``.pth`` whose unpickling would call ``os.system``: must be refused, never run."""
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"control_model.time_embed.0.weight": Evil()}))
    return path
