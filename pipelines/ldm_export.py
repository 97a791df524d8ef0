"""Write diffusers components back into the original (LDM / SGM) single-file layout.

diffusers only converts in the other direction (``from_single_file``), so this
module is the inverse of its readers in ``diffusers.loaders.single_file_utils``:
every key written here is one those readers look for, which is what the round
trip test in ``tests/pipelines/test_ldm_export.py`` proves.  Users' A1111
checkpoints use this layout; the tiny test/demo models are written with it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from pipelines.errors import InvalidParameter

FAMILIES = ("sd1", "sd2", "sdxl")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Where each family keeps its text encoders, and in which layout.
CLIP_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPENCLIP_PREFIX = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}

_UNET_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's text_time embedding and the class embedding share LDM's label_emb.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_UNET_RESNET.get(head, head)}.{tail}"


def unet_key(key: str, layers: int, up_has_attn: set[int]) -> str:
    """Map one diffusers UNet key to its LDM name (without the prefix)."""
    for diffusers, ldm in _UNET_FIXED.items():
        if key.startswith(diffusers + "."):
            return ldm + key[len(diffusers) :]
    # LDM numbers blocks flat: each down block holds `layers` (resnet, attention)
    # pairs plus a downsampler; each up block holds `layers + 1` pairs plus an upsampler.
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key):
        block, kind, idx, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = 1 + block * (layers + 1)
        if kind == "resnets":
            return f"input_blocks.{base + idx}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{base + idx}.1.{rest}"
        return f"input_blocks.{base + layers}.0.op.{rest.removeprefix('conv.')}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, idx, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * idx}.{_resnet(rest)}"
        return f"middle_block.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key):
        block, kind, idx, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = block * (layers + 1)
        if kind == "resnets":
            return f"output_blocks.{base + idx}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{base + idx}.1.{rest}"
        # The upsampler follows the attention when the block has one.
        slot = 2 if block in up_has_attn else 1
        return f"output_blocks.{base + layers}.{slot}.{rest}"
    raise InvalidParameter(f"UNet key {key!r} has no LDM equivalent", field="unet")


def export_unet(unet) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel → ``model.diffusion_model.*`` tensors."""
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise InvalidParameter("per-block layers_per_block has no LDM layout", field="unet")
    sd = unet.state_dict()
    up_has_attn = {int(k.split(".")[1]) for k in sd if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    return {UNET_PREFIX + unet_key(k, layers, up_has_attn): v for k, v in sd.items()}


def _vae_key(key: str, n_up: int) -> str:
    key = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    # The LDM decoder counts its up blocks from the lowest resolution upwards.
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", key)
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", key
    )
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    return key


def export_vae(vae) -> dict[str, torch.Tensor]:
    """AutoencoderKL → ``first_stage_model.*`` tensors (attention projections as 1×1 convs)."""
    n_up = len(vae.config.up_block_types)
    out = {}
    for k, v in vae.state_dict().items():
        ldm = _vae_key(k, n_up)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's attention uses 1×1 convolutions
        out[VAE_PREFIX + ldm] = v
    return out


def _text_model_keys(encoder) -> dict[str, torch.Tensor]:
    """State dict with the ``text_model.`` prefix: transformers 5 dropped it from CLIPTextModel."""
    out = {}
    for k, v in encoder.state_dict().items():
        if k.endswith("position_ids"):
            continue  # a buffer, not a weight
        if k.startswith("text_projection."):
            out[k] = v
        else:
            out[k if k.startswith("text_model.") else "text_model." + k] = v
    return out


def export_clip(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModel → HF-CLIP layout under ``prefix`` (``…transformer.text_model.*``)."""
    return {prefix + k: v for k, v in _text_model_keys(encoder).items() if not k.startswith("text_projection.")}


def export_open_clip(encoder, prefix: str, *, skipped_last_layer: bool) -> dict[str, torch.Tensor]:
    """CLIPTextModel(WithProjection) → OpenCLIP layout under ``prefix``.

    ``skipped_last_layer``: SD2 runs OpenCLIP-H up to its penultimate layer, so
    its diffusers text encoder has one layer fewer than the file (23 vs 24) and
    diffusers ignores the last one when reading.  We write that layer as zeros
    so the file has OpenCLIP's shape; nothing ever runs it.
    """
    sd = {k.removeprefix("text_model."): v for k, v in _text_model_keys(encoder).items()}
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").T.contiguous()  # OpenCLIP multiplies x @ P
    n_layers = encoder.config.num_hidden_layers
    for i in range(n_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
        for k in [k for k in sd if k.startswith(src)]:
            rest = k[len(src) :]
            for d_name, o_name in _CLIP_LAYER.items():
                if rest.startswith(d_name + "."):
                    rest = o_name + rest[len(d_name) :]
            out[dst + rest] = sd.pop(k)
    if sd:
        raise InvalidParameter(f"text encoder keys without an OpenCLIP name: {sorted(sd)[:5]}", field="text_encoder")
    if skipped_last_layer:
        last = f"transformer.resblocks.{n_layers - 1}."
        for k in [k for k in out if k.startswith(last)]:
            out[f"transformer.resblocks.{n_layers}." + k[len(last) :]] = torch.zeros_like(out[k])
    return {prefix + k: v for k, v in out.items()}


def export_state_dict(family: str, unet, vae, text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """All components of one pipeline as a single original-layout state dict.

    ``family`` is ``"sd1"``, ``"sd2"`` or ``"sdxl"`` (SDXL needs ``text_encoder_2``).
    Tensors are detached and contiguous, ready for :func:`save_single_file`.
    """
    if family not in FAMILIES:
        raise InvalidParameter(f"unknown family {family!r}; expected one of {FAMILIES}", field="family")
    sd = export_unet(unet) | export_vae(vae)
    if family == "sd1":
        sd |= export_clip(text_encoder, CLIP_PREFIX["sd1"])
    elif family == "sd2":
        sd |= export_open_clip(text_encoder, OPENCLIP_PREFIX["sd2"], skipped_last_layer=True)
    else:
        if text_encoder_2 is None:
            raise InvalidParameter("SDXL needs text_encoder_2", field="text_encoder_2")
        sd |= export_clip(text_encoder, CLIP_PREFIX["sdxl"])
        sd |= export_open_clip(text_encoder_2, OPENCLIP_PREFIX["sdxl"], skipped_last_layer=False)
    # Clone: safetensors refuses tensors that share storage with each other.
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_single_file(path: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``state_dict`` as ``.safetensors`` or as a ``.ckpt``/``.pt`` (``{"state_dict": …}``).

    Written to a temporary name first and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".ckpt", ".pt"):
        raise InvalidParameter(f"{path.name}: single files end in .safetensors, .ckpt or .pt", field="path")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state_dict, str(tmp), metadata={"format": "pt"})
        else:
            torch.save({"state_dict": state_dict}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
