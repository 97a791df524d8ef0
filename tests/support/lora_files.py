"""Write tiny LoRA files for the tiny test pipelines, in the layouts users download.

Plain functions (not a pytest plugin): tests import them.  Every writer draws the
same random factors for the same ``(pipe, family, seed, conv, te, unet, rank)``
(see :func:`lora_factors`), so a kohya file and a diffusers file written with one
seed hold the same LoRA under different names.

Naming follows the trainers: kohya SD1/SD2 files name UNet layers as diffusers
does (``lora_unet_down_blocks_0_attentions_0_…``), kohya SDXL files as the LDM/SGM
UNet does (``lora_unet_input_blocks_4_1_…``); text encoders are
``lora_te_`` (SD1/SD2) or ``lora_te1_``/``lora_te2_`` (SDXL) plus
``text_model_encoder_layers_…``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pipelines.ldm_export import unet_key

_TE_PREFIX = {"sd1": {"text_encoder": "lora_te_"}, "sd2": {"text_encoder": "lora_te_"}}
_TE_PREFIX["sdxl"] = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
_TE_LAYERS = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def _targets(pipe, family: str, *, conv: bool, te: bool, unet: bool):
    """(component, layer name, module) that kohya LoRA (and LoCon with ``conv``) trains."""
    if unet:
        for name, module in pipe.unet.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            in_transformer = ".attentions." in name
            is_1x1 = isinstance(module, torch.nn.Linear) or tuple(module.kernel_size) == (1, 1)
            in_resnet = re.search(r"\.(resnets|downsamplers|upsamplers)\.", name) is not None
            if (in_transformer and is_1x1) or (conv and in_resnet):
                yield "unet", name, module
    if te:
        for component in _TE_PREFIX[family]:
            for name, module in getattr(pipe, component).named_modules():
                if isinstance(module, torch.nn.Linear) and _TE_LAYERS.search(name):
                    yield component, name, module


def lora_factors(pipe, family: str, seed: int, *, conv=False, te=True, unet=True, rank=4, magnitude=0.3):
    """{(component, layer): (down, up)} with N(0, magnitude²) entries, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for component, name, module in _targets(pipe, family, conv=conv, te=te, unet=unet):
        if isinstance(module, torch.nn.Linear):
            down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
        else:
            down_shape, up_shape = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        down = torch.randn(down_shape, generator=gen) * magnitude
        up = torch.randn(up_shape, generator=gen) * magnitude
        out[(component, name)] = (down, up)
    return out


def _save(path: Path, tensors: dict, metadata: dict | None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)
    else:
        torch.save(tensors, path)
    return path


def kohya_layer_name(pipe, family: str, component: str, name: str, *, ldm_names: bool) -> str:
    """kohya's name for one layer, without the ``.lora_down.weight`` suffix."""
    if component != "unet":
        return _TE_PREFIX[family][component] + ("text_model." + name.removeprefix("text_model.")).replace(".", "_")
    if ldm_names:
        layers = pipe.unet.config.layers_per_block
        up_attn = {int(n.split(".")[1]) for n, _ in pipe.unet.named_modules() if re.match(r"up_blocks\.\d+\.attentions\.\d+$", n)}
        name = unet_key(name + ".weight", layers, up_attn).removesuffix(".weight")
    return "lora_unet_" + name.replace(".", "_")


def write_kohya_lora(
    path, pipe, family: str, seed: int, *, ldm_names: bool | None = None, conv=False, te=True, unet=True,
    rank=4, alpha: float | None = 2.0, magnitude=0.3, metadata: dict | None = None,
) -> Path:
    """A kohya LoRA (LoCon with ``conv``) for ``pipe``; ``.safetensors`` or ``.pt`` by suffix.

    ``ldm_names`` None means the trainer's usual naming: LDM for SDXL, diffusers for SD1/SD2.
    ``alpha`` None writes no ``.alpha`` tensors (scale 1).
    """
    ldm = family == "sdxl" if ldm_names is None else ldm_names
    tensors = {}
    factors = lora_factors(pipe, family, seed, conv=conv, te=te, unet=unet, rank=rank, magnitude=magnitude)
    for (component, name), (down, up) in factors.items():
        key = kohya_layer_name(pipe, family, component, name, ldm_names=ldm)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    return _save(path, tensors, metadata)


def write_diffusers_lora(
    path, pipe, family: str, seed: int, *, style="peft", conv=False, te=True, unet=True, rank=4, magnitude=0.3,
    metadata: dict | None = None,
) -> Path:
    """The same LoRA as :func:`write_kohya_lora` with ``alpha=rank``, in diffusers' layouts.

    ``style="peft"``: ``unet.<layer>.lora_A.weight`` / ``lora_B`` (diffusers ≥ 0.24).
    ``style="legacy"``: attention processors' ``attn1.processor.to_q_lora.down.weight``,
    ``<layer>.lora.down.weight`` elsewhere, ``text_model.….lora_linear_layer.down.weight``.
    ``metadata``: the safetensors header, e.g. diffusers' ``lora_adapter_metadata``.
    """
    tensors = {}
    factors = lora_factors(pipe, family, seed, conv=conv, te=te, unet=unet, rank=rank, magnitude=magnitude)
    for (component, name), (down, up) in factors.items():
        if style == "peft":
            keys = (f"{component}.{name}.lora_A.weight", f"{component}.{name}.lora_B.weight")
        elif component != "unet":
            base = f"{component}.text_model.{name.removeprefix('text_model.')}.lora_linear_layer"
            keys = (f"{base}.down.weight", f"{base}.up.weight")
        elif m := re.match(r"(.+\.attn[12])\.(to_q|to_k|to_v|to_out)(\.0)?$", name):
            base = f"unet.{m[1]}.processor.{m[2]}_lora"
            keys = (f"{base}.down.weight", f"{base}.up.weight")
        else:
            keys = (f"unet.{name}.lora.down.weight", f"unet.{name}.lora.up.weight")
        tensors[keys[0]], tensors[keys[1]] = down, up
    return _save(path, tensors, metadata)


def write_lycoris_lora(path, pipe, family: str, seed: int, *, kind="loha", rank=4) -> Path:
    """A LyCORIS LoHa (``hada_w1_a``…) or LoKr (``lokr_w1``, ``lokr_w2``) file over the attention layers."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, name, module in _targets(pipe, family, conv=False, te=True, unet=True):
        if not isinstance(module, torch.nn.Linear):
            continue
        key = kohya_layer_name(pipe, family, component, name, ldm_names=family == "sdxl")
        out_f, in_f = module.out_features, module.in_features
        if kind == "loha":
            for i in (1, 2):
                tensors[f"{key}.hada_w{i}_a"] = torch.randn(out_f, rank, generator=gen) * 0.1
                tensors[f"{key}.hada_w{i}_b"] = torch.randn(rank, in_f, generator=gen) * 0.1
        else:
            tensors[f"{key}.lokr_w1"] = torch.randn(2, 2, generator=gen) * 0.1
            tensors[f"{key}.lokr_w2"] = torch.randn(out_f // 2, in_f // 2, generator=gen) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    return _save(path, tensors, None)
