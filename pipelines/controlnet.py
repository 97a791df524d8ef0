"""Load ControlNet models offline: original single files, diffusers single files and folders.

Layouts users put in A1111's ``models/ControlNet/``:

- the original lllyasviel layout (``control_model.input_blocks.*``, ``input_hint_block.*``,
  ``zero_convs.*``, ``middle_block_out.*``; ``.pth`` for v1.1, ``.safetensors`` re-packs),
  sometimes without the ``control_model.`` prefix;
- diffusers' layout in one file (``controlnet_cond_embedding.*``, ``controlnet_down_blocks.*``:
  what SDXL ControlNets usually ship as), or a diffusers folder
  (``config.json`` + ``diffusion_pytorch_model.safetensors``).

The family (SD1 / SD2 / SDXL) is read from the keys and tensor shapes, the
architecture from, in order: ``<stem>.config/config.json`` beside the file, a
``config.json`` in the same folder (diffusers folders), or the bundled
``container/configs/controlnet-sd15`` / ``controlnet-sd21`` / ``controlnet-sdxl`` (the public
ControlNet v1.1 SD1.5, SD2.1 and diffusers SDXL architectures).  Pickles (``.pth``/``.ckpt``/``.pt``)
are only opened with ``weights_only=True``.

The model is built on the meta device and the converted tensors are assigned
into it, so a load costs one read of the file and no random initialisation.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.checkpoint import safe_torch_load
from pipelines.errors import InvalidParameter, ModelNotFound, ModelRejected

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
BUNDLED = {"sd1": "controlnet-sd15", "sd2": "controlnet-sd21", "sdxl": "controlnet-sdxl"}
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
_LDM_PREFIX = "control_model."
# Context width → family, for files of the real sizes (tiny test models fall back to label_emb).
_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass
class LoadedControlNet:
    """A ready ``ControlNetModel`` and what we learned about its file."""

    model: object  # diffusers.ControlNetModel
    family: str
    layout: str  # "original" or "diffusers"
    config_source: str


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ControlNet file (safetensors, or a weights-only pickle)."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ModelRejected(f"{path.name}: not a ControlNet file (expected {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise ModelNotFound(f"{path.name}: no such file ({path})")
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise ModelRejected(f"{path.name}: corrupt safetensors file ({exc})") from exc
    data = safe_torch_load(path, "ControlNet")
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelRejected(f"{path.name}: holds a {type(data).__name__}, not a state dict")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def detect_layout(keys) -> str:
    """"original" (lllyasviel cldm, with or without ``control_model.``) or "diffusers"."""
    keys = set(keys)
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "diffusers"
    if f"{_LDM_PREFIX}input_hint_block.0.weight" in keys or "input_hint_block.0.weight" in keys:
        return "original"
    raise ModelRejected("not a ControlNet: no hint encoder (input_hint_block / controlnet_cond_embedding) in the file")


def detect_family(state: dict[str, torch.Tensor]) -> str:
    """"sd1", "sd2" or "sdxl" from the keys (SDXL's text_time embedding) and the cross-attention width."""
    for key, tensor in state.items():
        if key.endswith("attn2.to_k.weight") and tensor.ndim == 2:
            family = _CONTEXT_FAMILY.get(int(tensor.shape[1]))
            if family is not None:
                return family
            break
    if any("label_emb." in k or k.startswith("add_embedding.") for k in state):
        return "sdxl"
    return "sd1"


def context_dim(state: dict[str, torch.Tensor]) -> int | None:
    """Width of the text embeddings the ControlNet attends to (None without cross-attention)."""
    for key, tensor in state.items():
        if key.endswith("attn2.to_k.weight") and tensor.ndim == 2:
            return int(tensor.shape[1])
    return None


def _configs_root() -> Path:
    return Path(__file__).resolve().parent.parent / "container" / "configs"


def find_config(path: Path, family: str) -> tuple[dict, str]:
    """The diffusers config for the file at ``path`` (see the module docstring for the order)."""
    from diffusers import ControlNetModel

    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    for candidate in (path.parent / f"{stem}.config" / "config.json", path.parent / "config.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text()), str(candidate)
            except (OSError, ValueError) as exc:
                raise ModelRejected(f"{path.name}: unreadable config {candidate.name} ({exc})") from exc
    bundled = BUNDLED.get(family)
    if bundled is None:
        raise ModelRejected(
            f"{path.name}: {FAMILY_NAMES[family]} ControlNets need their diffusers config beside the file "
            f"({stem}.config/config.json)"
        )
    return dict(ControlNetModel.load_config(str(_configs_root() / bundled))), f"bundled {bundled}"


def _to_diffusers(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Original layout → diffusers names (diffusers' own converter, plus SDXL's text_time embedding it skips)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    bare = {k.removeprefix(_LDM_PREFIX): v for k, v in state.items()}
    out = convert_controlnet_checkpoint(bare, config)
    for ldm, diff in (("label_emb.0.0", "linear_1"), ("label_emb.0.2", "linear_2")):
        for kind in ("weight", "bias"):
            if f"{ldm}.{kind}" in bare:
                target = "add_embedding" if config.get("addition_embed_type") else "class_embedding"
                out[f"{target}.{diff}.{kind}"] = bare[f"{ldm}.{kind}"]
    return {k: v for k, v in out.items() if v is not None}


def _fit_sdxl_depth(config: dict, state: dict[str, torch.Tensor]) -> dict:
    """Bundled SDXL config, with the transformer depth per block the file really has (full/mid/small variants)."""
    depth = []
    for block, _ in enumerate(config["down_block_types"]):
        ids = {int(m[1]) for k in state if (m := re.match(rf"down_blocks\.{block}\.attentions\.0\.transformer_blocks\.(\d+)\.", k))}
        depth.append(max(ids) + 1 if ids else 1)
    return {**config, "transformer_layers_per_block": depth}


def build_controlnet(state: dict[str, torch.Tensor], config: dict, name: str):
    """A ControlNetModel with ``state`` assigned into a meta-device skeleton; strict key and shape check."""
    from diffusers import ControlNetModel

    try:
        with torch.device("meta"):
            model = ControlNetModel.from_config(config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise ModelRejected(f"{name}: does not match its ControlNet config ({type(exc).__name__}: {str(exc)[:300]})") from exc
    if missing or unexpected:
        raise ModelRejected(
            f"{name}: does not match its ControlNet config (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model.eval().requires_grad_(False)


def load_controlnet(path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedControlNet:
    """Load the ControlNet at ``path`` (file, or diffusers folder) onto ``device``/``dtype``."""
    path = Path(path)
    if path.is_dir():
        weights = [path / f"diffusion_pytorch_model{s}" for s in (".safetensors", ".bin")]
        found = [w for w in weights if w.is_file()]
        if not found:
            raise ModelNotFound(f"{path.name}: a diffusers ControlNet folder needs diffusion_pytorch_model.safetensors")
        path = found[0]
    state = read_tensors(path)
    layout = detect_layout(state)
    family = detect_family(state)
    config, source = find_config(path, family)
    if layout == "original":
        try:
            state = _to_diffusers(state, config)
        except (KeyError, IndexError, TypeError) as exc:
            raise ModelRejected(f"{path.name}: unexpected original-layout ControlNet ({type(exc).__name__}: {exc})") from exc
    if family == "sdxl" and source.startswith("bundled"):
        config = _fit_sdxl_depth(config, state)
    # cast before assigning: the model is never materialised in the file's dtype
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model = build_controlnet(state, config, path.name)
    log.info("loaded %s ControlNet %s (%s layout, config: %s)", FAMILY_NAMES[family], path.name, layout, source)
    return LoadedControlNet(model, family, layout, source)


def check_compatible(loaded: LoadedControlNet, unet, checkpoint_family: str, *, name: str, checkpoint: str, field: str) -> None:
    """422 when the ControlNet cannot steer this checkpoint's UNet (SD1 vs SDXL, or another text width)."""
    cn_family, ck_family = loaded.family, checkpoint_family
    fam = FAMILY_NAMES.get
    if (cn_family == "sdxl") != (ck_family == "sdxl") or {cn_family, ck_family} == {"sd1", "sd2"}:
        raise InvalidParameter(
            f"{field}: ControlNet '{name}' is a {fam(cn_family, cn_family)} ControlNet but checkpoint "
            f"'{checkpoint}' is {fam(ck_family, ck_family)}; use a ControlNet made for {fam(ck_family, ck_family)}",
            field=field,
        )
    want = unet.config.cross_attention_dim
    have = loaded.model.config.cross_attention_dim
    if want != have:
        raise InvalidParameter(
            f"{field}: ControlNet '{name}' expects {have}-wide text embeddings, checkpoint '{checkpoint}' gives {want}",
            field=field,
        )
