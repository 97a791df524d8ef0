"""Writers of tiny extra-network files in the formats users download: A1111 hypernetworks, embeddings, VAEs.

Plain functions (not a pytest plugin).  They build the files from the published
formats by hand, independently of the readers in ``pipelines/``, so a test that
loads them checks compatibility rather than a round trip through our own code.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipelines.ldm_export import VAE_PREFIX, export_vae


def _mlp_state(dim: int, structure, *, activation: str | None, layer_norm: bool, activate_output: bool,
               use_dropout: bool, last_layer_dropout: bool, std: float, gen: torch.Generator) -> OrderedDict:
    """State dict of one A1111 HypernetworkModule: Linear [act] [LayerNorm] [Dropout] per step, indexed in order."""
    state, index, count = OrderedDict(), 0, len(structure)
    for i in range(count - 1):
        width_in, width_out = int(dim * structure[i]), int(dim * structure[i + 1])
        state[f"linear.{index}.weight"] = torch.randn(width_out, width_in, generator=gen) * std
        state[f"linear.{index}.bias"] = torch.randn(width_out, generator=gen) * std
        index += 1
        if activation not in (None, "linear") and (i < count - 2 or activate_output):
            index += 1  # parameter-free activation module
        if layer_norm:
            state[f"linear.{index}.weight"] = 1 + torch.randn(width_out, generator=gen) * std
            state[f"linear.{index}.bias"] = torch.randn(width_out, generator=gen) * std
            index += 1
        hidden = i + 1 < count - 1  # the output of this Linear feeds another Linear
        if use_dropout and hidden and (i + 1 < count - 2 or last_layer_dropout):
            index += 1  # Dropout module
    return state


def write_hypernetwork(path, sizes, *, layer_structure=(1, 2, 1), activation_func: str | None = "relu",
                       is_layer_norm: bool = False, use_dropout: bool = False, last_layer_dropout: bool = False,
                       activate_output: bool = False, std: float = 0.2, seed: int = 0, name: str | None = None,
                       old_key_names: bool = False) -> Path:
    """Write an A1111 hypernetwork ``.pt`` with random weights for each context width in ``sizes``.

    ``old_key_names`` writes the pre-October-2022 ``linear1``/``linear2`` names
    (only meaningful with a two-Linear, activation-free structure).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    options = {"activation": activation_func, "layer_norm": is_layer_norm, "activate_output": activate_output,
               "use_dropout": use_dropout, "last_layer_dropout": last_layer_dropout, "std": std, "gen": gen}
    data: dict = {}
    for size in sizes:
        pair = []
        for _ in range(2):
            state = _mlp_state(size, list(layer_structure), **options)
            if old_key_names:
                state = OrderedDict((k.replace("linear.0.", "linear1.").replace("linear.1.", "linear2."), v)
                                    for k, v in state.items())
            pair.append(state)
        data[int(size)] = tuple(pair)  # A1111 saves (k, v) tuples
    data.update({
        "step": 100, "name": name or path.stem, "layer_structure": list(layer_structure),
        "activation_func": activation_func, "is_layer_norm": is_layer_norm, "weight_initialization": "Normal",
        "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny", "activate_output": activate_output,
        "use_dropout": use_dropout, "last_layer_dropout": last_layer_dropout,
    })
    torch.save(data, path)
    return path


def random_vectors(count: int, width: int, seed: int = 0, std: float = 1.0) -> torch.Tensor:
    """``count`` random embedding vectors of ``width``, reproducible from ``seed``."""
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed)) * std


def write_embedding(path, fmt: str, vectors=None, *, clip_l=None, clip_g=None, token: str | None = None) -> Path:
    """Write an embedding file in one of the formats users bring.

    ``fmt``: ``"a1111-pt"`` (``string_to_param``), ``"a1111-safetensors"``
    (``emb_params``), ``"diffusers-bin"`` / ``"diffusers-safetensors"``
    (``{token: tensor}``), ``"sdxl"`` (``clip_l`` + ``clip_g``, safetensors).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "a1111-pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone()},
                    "name": path.stem, "step": 1000, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny"}, path)
    elif fmt == "a1111-safetensors":
        save_file({"emb_params": vectors.contiguous()}, str(path))
    elif fmt == "diffusers-bin":
        torch.save({token or f"<{path.stem}>": vectors.clone()}, path)
    elif fmt == "diffusers-safetensors":
        save_file({token or f"<{path.stem}>": vectors.contiguous()}, str(path))
    elif fmt == "sdxl":
        save_file({"clip_l": clip_l.contiguous(), "clip_g": clip_g.contiguous()}, str(path))
    else:
        raise ValueError(f"unknown embedding format {fmt!r}")
    return path


def write_vae(path, vae, *, prefixed: bool = True) -> Path:
    """Write ``vae`` as an A1111 single-file VAE: ``first_stage_model.*`` keys or bare ``encoder.*``/``decoder.*``.

    ``.safetensors`` is written with safetensors, anything else (``.pt``, ``.ckpt``)
    as a torch pickle nesting the weights under ``state_dict`` like the files users download.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = export_vae(vae)
    if not prefixed:
        state = {k.removeprefix(VAE_PREFIX): v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path


def write_vae_folder(folder, vae) -> Path:
    """Write ``vae`` as a diffusers folder (``config.json`` + weights)."""
    folder = Path(folder)
    vae.save_pretrained(folder)
    return folder
