"""Read LoRA files and turn them into peft-format state dicts for one pipeline.

Used by :mod:`pipelines.lora`.  We do the key mapping ourselves instead of
handing files to diffusers' converters, for three reasons: diffusers' SD1
loader fails on LDM-named kohya keys (``lora_unet_input_blocks_…``); its
converters drop layers they do not know without saying so; and a LoRA for the
wrong model family must become a clear error, not a peft traceback.

How: every Linear/Conv2d layer of the pipeline gets a *flat* name (dots →
underscores, as kohya and A1111 name layers), plus its LDM alias for the UNet
(``input_blocks_1_1_…`` for ``down_blocks_0_attentions_0_…``) and its name with
and without ``text_model.`` for the text encoders (transformers 5 dropped that
prefix from ``CLIPTextModel``).  A LoRA layer must match one of these names and
the layer's shape, or the whole file is refused.  kohya's ``alpha / rank``
scale is baked into ``lora_B``, so peft runs every layer at scale 1 × weight,
which is A1111's ``W + up·down·alpha/rank·multiplier``.

Loaded: kohya LoRA and LoCon (``lora_unet_*``, ``lora_te_*``, ``lora_te1_*`` /
``lora_te2_*``; ``.lora_down/.lora_up/.alpha``; diffusers or LDM block names),
diffusers/peft files (``unet.….lora_A/lora_B``, ``….lora.down``,
``processor.to_q_lora.down``, ``lora_linear_layer``; ``lora_alpha`` from
diffusers' ``lora_adapter_metadata`` header).  Refused with ModelRejected
naming the format: LyCORIS LoHa, LoKr, CP-decomposed LoCon, DoRA, OFT, (IA)³,
GLoRA, full/norm diffs.  diffusers 0.42 loads LoKr only into single-transformer
models (Flux2, Z-Image): the SD loader wants "lora" in every key and its
text-encoder path is LoRA-only, so SD LoKr would be UNet-only at best.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.errors import InvalidParameter, ModelNotFound, ModelRejected

FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
# kohya key prefix → pipeline component, per checkpoint family.
_KOHYA_COMPONENTS = {
    "sdxl": {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"},
    "sd1": {"lora_unet_": "unet", "lora_te_": "text_encoder"},
    "sd2": {"lora_unet_": "unet", "lora_te_": "text_encoder"},
}
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# Tensor names of formats we refuse, checked in this order.
_UNSUPPORTED = tuple(
    (re.compile(pattern), fmt)
    for pattern, fmt in (
        (r"\.hada_[wt]\d", "LoHa"),
        (r"\.lokr_[wt]\d", "LoKr"),
        (r"\.lora_mid\.", "LoCon with CP/Tucker decomposition (lora_mid)"),
        (r"dora_scale|lora_magnitude_vector", "DoRA"),
        (r"\.b?oft_", "OFT"),
        (r"\.on_input$", "(IA)³"),
        (r"\.[ab][12]\.weight$", "GLoRA"),
        (r"\.diff(_b)?$", "LyCORIS full-weight difference"),
        (r"\.[wb]_norm$", "LyCORIS norm layers"),
    )
)
_KOHYA_SUFFIX = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_DIFFUSERS_SUFFIX = re.compile(
    r"^(?P<module>.+?)(?:\.lora_(?P<peft>[AB])\.weight|[._]lora(?:_linear_layer)?\.(?P<old>down|up)\.weight|\.(?P<alpha>alpha))$"
)
_TE_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_CROSS_ATTN_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass(frozen=True)
class LayerInfo:
    """One adaptable layer of the pipeline: its dotted name in its component and its shape."""

    module: str
    conv: bool
    in_dim: int
    out_dim: int
    kernel: tuple[int, int] = (1, 1)


@dataclass
class LoraData:
    """A LoRA file as read: tensors, safetensors metadata and A1111's hash of it."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    a1111_hash: str  # full hex; A1111 writes its first 12 characters


def a1111_hash_of_bytes(data: bytes, *, is_safetensors: bool, sha256: str, metadata: dict | None = None) -> str:
    """The hash A1111 shows for a LoRA (``NetworkOnDisk``): full hex, infotext uses ``[:12]``.

    A1111 takes the ``sshs_model_hash`` the trainer wrote into the metadata; else, for
    ``.safetensors``, the sha256 of the bytes after the header (kohya/additional-networks
    "addnet" hash, stable under metadata edits); else the file's plain sha256.
    """
    written = (metadata or {}).get("sshs_model_hash", "")
    if re.fullmatch(r"[0-9a-fA-F]{12,64}", written or ""):
        return written.lower()
    if not is_safetensors:
        return sha256
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest()


def read_lora_file(path: Path, sha256: str) -> LoraData:
    """Read a ``.safetensors`` / ``.pt`` / ``.ckpt`` LoRA; ModelRejected (naming the file) if unreadable."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        from pipelines.checkpoint import read_state_dict  # refuses unsafe pickles

        tensors = read_state_dict(path)
        return LoraData(tensors, {}, a1111_hash_of_bytes(b"", is_safetensors=False, sha256=sha256))
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelNotFound(f"{path.name}: no such file ({path})") from exc
    try:
        header_len = int.from_bytes(data[:8], "little")
        if len(data) < 8 or header_len > len(data) - 8:
            raise ValueError("header length points past the end of the file")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        tensors = load(data)
    except (SafetensorError, ValueError, AttributeError) as exc:
        raise ModelRejected(f"{path.name}: corrupt safetensors file ({exc})") from exc
    a1111 = a1111_hash_of_bytes(data, is_safetensors=True, sha256=sha256, metadata=metadata)
    return LoraData(tensors, metadata, a1111)


def _flat(name: str) -> str:
    return name.replace(".", "_")


def layer_table(pipe, family: str) -> dict[str, dict[str, LayerInfo]]:
    """component → {flat name or alias: LayerInfo} for every Linear/Conv2d the pipeline has.

    Layers already wrapped by peft are described by their base layer.  Names that
    would be ambiguous after flattening map to nothing.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from pipelines.ldm_export import unet_key  # the tested diffusers → LDM UNet naming

    table: dict[str, dict[str, LayerInfo]] = {}
    for component in set(_KOHYA_COMPONENTS[family].values()):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        entries: dict[str, LayerInfo | None] = {}
        modules = dict(model.named_modules())
        wrapped = [n for n, m in modules.items() if isinstance(m, BaseTunerLayer)]
        layers = getattr(model.config, "layers_per_block", None)
        up_attn = {int(n.split(".")[1]) for n in modules if re.match(r"up_blocks\.\d+\.attentions\.\d+$", n)}
        for name, module in modules.items():
            if any(name.startswith(w + ".") for w in wrapped):
                continue  # peft's own sub-layers (base_layer, lora_A, …)
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(base, torch.nn.Linear):
                info = LayerInfo(name, False, base.in_features, base.out_features)
            elif isinstance(base, torch.nn.Conv2d) and base.groups == 1:
                info = LayerInfo(name, True, base.in_channels, base.out_channels, tuple(base.kernel_size))
            else:
                continue
            aliases = {name}
            if component == "unet" and isinstance(layers, int):
                try:
                    aliases.add(unet_key(name + ".weight", layers, up_attn).removesuffix(".weight"))
                except InvalidParameter:
                    pass
            elif component != "unet":
                bare = name.removeprefix("text_model.")
                aliases |= {bare, "text_model." + bare}
            for alias in aliases:
                key = _flat(alias)
                entries[key] = None if key in entries and entries[key] != info else info
        table[component] = {k: v for k, v in entries.items() if v is not None}
    return table


def refuse_unsupported(keys, file_name: str) -> None:
    """ModelRejected naming the format when the file is LyCORIS LoHa/LoKr/… rather than LoRA/LoCon."""
    for pattern, fmt in _UNSUPPORTED:
        if any(pattern.search(k) for k in keys):
            raise ModelRejected(f"{file_name}: {fmt} is not supported (LoRA and LoCon files are)")


def guess_family(tensors: dict[str, torch.Tensor], metadata: dict) -> tuple[str | None, str]:
    """(family or None, evidence) for a LoRA file: used to word mismatch errors only."""
    base = str(metadata.get("ss_base_model_version", "")) + " " + str(metadata.get("modelspec.architecture", ""))
    if "sdxl" in base or "stable-diffusion-xl" in base:
        return "sdxl", "its metadata"
    if "sd_v2" in base or "stable-diffusion-v2" in base or metadata.get("ss_v2") == "True":
        return "sd2", "its metadata"
    if "sd_v1" in base or "stable-diffusion-v1" in base:
        return "sd1", "its metadata"
    keys = list(tensors)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl", "its lora_te1/lora_te2 keys"
    for key in keys:
        is_down = key.endswith(("lora_down.weight", "lora_A.weight", ".down.weight"))
        if is_down and "attn2" in key and re.search(r"to_[kv]", key) and tensors[key].ndim >= 2:
            width = tensors[key].shape[1]
            if width in _CROSS_ATTN_WIDTH:
                return _CROSS_ATTN_WIDTH[width], f"its {width}-wide cross-attention"
    if any(k.startswith("lora_te_") for k in keys):
        return "sd1", "its lora_te keys"
    return None, ""


def _parse_kohya(key: str, family: str) -> tuple[str | None, str, str] | None:
    """(component or None when the family has no such component, flat layer name, part)."""
    layer, _, suffix = key.partition(".")
    part = _KOHYA_SUFFIX.get(suffix)
    prefix = next((p for p in _KOHYA_PREFIXES if layer.startswith(p)), None)
    if part is None or prefix is None:
        return None
    return _KOHYA_COMPONENTS[family].get(prefix), layer[len(prefix) :], part


def _parse_diffusers(key: str, family: str) -> tuple[str | None, str, str] | None:
    component, _, rest = key.partition(".")
    m = _DIFFUSERS_SUFFIX.match(rest)
    if component not in _DIFFUSERS_COMPONENTS or m is None:
        return None
    part = "alpha" if m["alpha"] else ("down" if m["peft"] == "A" or m["old"] == "down" else "up")
    module = m["module"].replace(".processor.", ".")
    head, _, last = module.rpartition(".")
    if last == "to_out":
        last = "out_proj" if component != "unet" else "to_out.0"
    elif component != "unet":
        last = _TE_ATTN.get(last, last)
    if component not in _KOHYA_COMPONENTS[family].values():
        component = None
    return component, _flat(f"{head}.{last}" if head else last), part


def _fit(tensor: torch.Tensor, conv: bool, kernel: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """Reshape between Linear [o, i] and 1×1 Conv2d [o, i, 1, 1] forms, as A1111 does."""
    if conv and tensor.ndim == 2 and kernel == (1, 1):
        return tensor[:, :, None, None]
    if not conv and tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1):
        return tensor[:, :, 0, 0]
    return tensor


def _shape_ok(info: LayerInfo, down: torch.Tensor, up: torch.Tensor) -> bool:
    rank = down.shape[0]
    if info.conv:
        return (
            down.ndim == 4 and up.ndim == 4 and tuple(down.shape[1:]) == (info.in_dim, *info.kernel)
            and tuple(up.shape) == (info.out_dim, rank, 1, 1)
        )
    return down.ndim == 2 and up.ndim == 2 and down.shape[1] == info.in_dim and tuple(up.shape) == (info.out_dim, rank)


def _peft_scales(metadata: dict) -> dict[str, tuple[float | None, dict, bool]]:
    """component → (lora_alpha, alpha_pattern, use_rslora) from diffusers' ``lora_adapter_metadata`` header."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        return {}
    out = {}
    for component in _DIFFUSERS_COMPONENTS:
        alpha = config.get(f"{component}.lora_alpha")
        pattern = config.get(f"{component}.alpha_pattern") or {}
        out[component] = (alpha, pattern, bool(config.get(f"{component}.use_rslora")))
    return out


def _peft_scale(settings, module: str, rank: int) -> float:
    """peft's scaling for one layer: alpha (pattern, else lora_alpha, else rank) / rank, or / √rank with rsLoRA."""
    alpha, pattern, rslora = settings or (None, {}, False)
    # peft matches alpha_pattern keys as regular expressions on the layer name's tail.
    matched = next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", module)), None)
    alpha = float(matched if matched is not None else alpha if alpha is not None else rank)
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def to_peft_state_dict(
    lora: LoraData, table: dict[str, dict[str, LayerInfo]], family: str, label: str
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """peft-format state dict (``<component>.<layer>.lora_A/B.weight``) and the components it touches.

    ``label`` names the LoRA in errors (``'name' (file.safetensors)``).  Raises
    ModelRejected for formats we do not load and InvalidParameter when the LoRA
    does not fit this checkpoint (wrong family, shapes that differ).
    """
    keys = list(lora.tensors)
    refuse_unsupported(keys, label)
    if not keys:
        raise ModelRejected(f"{label}: holds no tensors")
    kohya = all(k.startswith(_KOHYA_PREFIXES) for k in keys)
    parse = _parse_kohya if kohya else _parse_diffusers
    layers: dict[tuple[str | None, str], dict[str, torch.Tensor]] = {}
    for key in keys:
        parsed = parse(key, family)
        if parsed is None:
            raise ModelRejected(f"{label}: not a LoRA layout we know (tensor {key!r})")
        component, flat, part = parsed
        layers.setdefault((component, flat), {})[part] = lora.tensors[key]
    peft_settings = {} if kohya else _peft_scales(lora.metadata)

    out: dict[str, torch.Tensor] = {}
    unmatched, misshaped = [], []
    for (component, flat), parts in layers.items():
        if "down" not in parts or "up" not in parts:
            raise ModelRejected(f"{label}: layer {flat} lacks its {'up' if 'down' in parts else 'down'} weight")
        info = table.get(component or "", {}).get(flat)
        if info is None:
            unmatched.append(flat)
            continue
        down, up = _fit(parts["down"], info.conv, info.kernel), _fit(parts["up"], info.conv)
        if not _shape_ok(info, down, up):
            misshaped.append(f"{flat} {tuple(parts['down'].shape)}")
            continue
        rank = down.shape[0]
        if "alpha" in parts:  # kohya: alpha / rank, and no alpha means scale 1
            scale = float(parts["alpha"]) / rank
        else:
            scale = _peft_scale(peft_settings.get(component), info.module, rank) if not kohya else 1.0
        prefix = f"{component}.{info.module}"
        out[f"{prefix}.lora_A.weight"] = down.float().contiguous()
        out[f"{prefix}.lora_B.weight"] = (up.float() * scale).contiguous()
    if unmatched or misshaped:
        raise InvalidParameter(_mismatch_message(lora, label, family, len(layers), unmatched, misshaped), field="prompt")
    return out, {k.split(".", 1)[0] for k in out}


def _mismatch_message(lora: LoraData, label: str, family: str, total: int, unmatched, misshaped) -> str:
    guess, evidence = guess_family(lora.tensors, lora.metadata)
    checkpoint = FAMILY_NAMES[family]
    if guess and guess != family:
        why = f"it is an {FAMILY_NAMES[guess]} LoRA (by {evidence}) and the checkpoint is {checkpoint}"
    else:
        why = f"it was made for a different model than this {checkpoint} checkpoint"
    parts = []
    if unmatched:
        parts.append(f"{len(unmatched)} of {total} layers have no counterpart (e.g. {', '.join(sorted(unmatched)[:2])})")
    if misshaped:
        parts.append(f"{len(misshaped)} of {total} layers have other shapes (e.g. {', '.join(sorted(misshaped)[:2])})")
    return f"LoRA {label} does not fit: {why}; {'; '.join(parts)}"
