"""Detect and load single-file Stable Diffusion checkpoints (SD1, SD2, SDXL), offline.

A checkpoint is one file in the original (LDM / SGM) layout.  We tell the
family from its key names, choose a diffusers config folder (``<stem>.config/``
beside the file, else the bundled ``container/configs/*``) and let diffusers'
``from_single_file`` convert it.

Reading once: diffusers' *pipeline* ``from_single_file`` only accepts a path and
always reads the whole file itself.  So detection never loads tensors: for
``.safetensors`` it reads the header (``safe_open(...).keys()``), for zip-format
``.ckpt``/``.pt`` it unpickles with ``mmap=True`` so tensor storage stays
unread on disk.  Only diffusers then reads the weights.  Pickles are only ever
opened with ``weights_only=True`` (diffusers does the same), so a pickle that
would run code is refused before anything executes.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.errors import ModelNotFound, ModelRejected

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt")
SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
BUNDLED = {"sd1": "sd15", "sd2": "sd21-base", "sdxl": "sdxl-base"}
SD2_V_CONFIG = "sd21"


@dataclass
class LoadedCheckpoint:
    """A ready pipeline and what we learned about its checkpoint."""

    pipe: object
    family: str
    prediction_type: str
    default_size: int
    config_dir: Path


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ModelRejected(f"{path.name}: not a checkpoint file (expected {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise ModelNotFound(f"{path.name}: no such file ({path})")
    return suffix


def safe_torch_load(path: Path, kind: str | None = None, *, mmap: bool = False):
    """``torch.load`` with ``weights_only=True``: a pickle that would run code is refused, nothing executed.

    ``kind`` names the file's role in messages ("hypernetwork", "embedding"; None: a checkpoint).
    Raises ModelRejected naming the file for unsafe or unreadable files.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global outside torch's allowlist, before calling it.
        # torch's message is long and suggests weights_only=False; keep only the reason.
        reason = re.search(r"Unsupported[^\n]*?(?=\. Please|\.?$)", str(exc), re.M)
        detail = reason.group(0) if reason else "it holds more than tensors and plain data"
        raise ModelRejected(f"refusing to unpickle {kind + ' ' if kind else ''}{path.name}: {detail}") from exc
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, RuntimeError) and "memory" in str(exc).lower():
            raise  # out of memory is not the file's fault
        raise ModelRejected(f"{path.name}: unreadable {kind or 'checkpoint'} file ({type(exc).__name__}: {exc})") from exc


def _unpickle(path: Path, *, mmap: bool) -> dict:
    data = safe_torch_load(path, mmap=mmap)
    # Lightning / A1111 files nest the weights under "state_dict".
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelRejected(f"{path.name}: holds a {type(data).__name__}, not a state dict")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a ``.safetensors`` / ``.ckpt`` / ``.pt`` file into memory.

    Raises ModelRejected (naming the file) for a corrupt header, an unsafe
    pickle or an unknown extension, ModelNotFound for a missing file.
    """
    path = Path(path)
    if _check_suffix(path) != ".safetensors":
        return _unpickle(path, mmap=False)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise ModelRejected(f"{path.name}: corrupt safetensors file ({exc})") from exc


def read_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names of a checkpoint without reading the tensors (see the module docstring)."""
    path = Path(path)
    if _check_suffix(path) != ".safetensors":
        # mmap needs the zip format of torch >= 1.6; older pickles are read whole.
        return list(_unpickle(path, mmap=zipfile.is_zipfile(path)))
    from safetensors import SafetensorError, safe_open

    try:
        # safe_open validates the header against the file size: truncation is caught here.
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except SafetensorError as exc:
        raise ModelRejected(f"{path.name}: corrupt safetensors file ({exc})") from exc


def _looks_like(keys: set[str]) -> str:
    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("lora_down") or has("lora_up") or has("lora_A") or has(".alpha"):
        return "a LoRA"
    if any(k.startswith("control_model.") for k in keys):
        return "a ControlNet"
    if "string_to_param" in keys or "emb_params" in keys or has("string_to_param."):
        return "a textual inversion embedding"
    if has("joint_blocks.") or any(k.startswith("text_encoders.") for k in keys):
        return "Stable Diffusion 3"
    if has("double_blocks."):
        return "Flux"
    if any(k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.")) for k in keys):
        return "a VAE"
    if keys and all(k.startswith("model.diffusion_model.") for k in keys):
        return "a UNet without text encoder or VAE"
    return "an unknown layout"


def detect_family(keys, name: str = "checkpoint") -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from state-dict key names; ModelRejected otherwise.

    ``name`` (the file name) goes into the error message.
    """
    keys = set(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("model.diffusion_model.") and not has("model.diffusion_model.joint_blocks."):
        if has("conditioner.embedders.1.model."):
            return "sdxl"
        if has("conditioner.embedders.0.model."):
            raise ModelRejected(f"{name}: looks like an SDXL refiner, which is not supported as a checkpoint")
        if has("cond_stage_model.model."):
            return "sd2"
        if has("cond_stage_model.transformer."):
            return "sd1"
    raise ModelRejected(f"{name}: not an SD1/SD2/SDXL checkpoint; it looks like {_looks_like(keys)}")


def _yaml_prediction_type(path: Path) -> str | None:
    """A1111's ``<stem>.yaml`` beside the checkpoint: ``model.params.parameterization: "v"`` means v-prediction."""
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        params = (config.get("model") or {}).get("params") or {}
    except (yaml.YAMLError, AttributeError) as exc:
        raise ModelRejected(f"{yaml_path.name}: not a readable model config ({exc})") from exc
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


@torch.no_grad()
def unet_predicts_v(unet) -> bool:
    """A1111's SD2 test: on a constant input at t=999, a v-model's output minus input averages below -1."""
    param = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=param.device, dtype=param.dtype)
    timestep = torch.tensor([999], device=param.device)
    out = unet(x, timestep, encoder_hidden_states=context).sample
    return (out.float() - x.float()).mean().item() < -1


def _configs_root(configs_root) -> Path:
    if configs_root is not None:
        return Path(configs_root)
    import container

    return Path(container.__file__).parent / "configs"


def _use_v_config(pipe, v_dir: Path) -> None:
    """Turn a pipeline loaded with ``sd21-base`` into ``sd21``: only configs differ, not weights."""
    import json

    import diffusers

    sched_cfg = json.loads((v_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    pipe.scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    unet_cfg = json.loads((v_dir / "unet" / "config.json").read_text(encoding="utf-8"))
    pipe.unet.register_to_config(sample_size=unet_cfg["sample_size"], upcast_attention=unet_cfg["upcast_attention"])
    for module in pipe.unet.modules():
        if hasattr(module, "upcast_attention"):  # read at call time by the non-SDPA processors
            module.upcast_attention = unet_cfg["upcast_attention"]


def load_pipeline(path, *, device: str = "cpu", dtype: torch.dtype = torch.float32, configs_root=None) -> LoadedCheckpoint:
    """Load a single-file checkpoint into a diffusers pipeline, never touching the network.

    Config: ``<stem>.config/`` beside the file if present, else
    ``<configs_root>/{sd15,sd21,sd21-base,sdxl-base}`` (default: the bundled
    ``container/configs``).  SD2 v-prediction comes from ``<stem>.yaml`` or,
    with bundled configs and no yaml, from A1111's :func:`unet_predicts_v`.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from huggingface_hub import constants as hub_constants

    path = Path(path)
    family = detect_family(read_keys(path), path.name)
    if not hub_constants.HF_HUB_OFFLINE:
        log.warning("HF_HUB_OFFLINE is not set; loading %s with local_files_only=True anyway", path.name)
    yaml_prediction = _yaml_prediction_type(path)
    own_config = path.with_name(path.stem + ".config")
    root = _configs_root(configs_root)
    if own_config.is_dir():
        config_dir = own_config
    elif family == "sd2" and yaml_prediction == "v_prediction":
        config_dir = root / SD2_V_CONFIG
    else:
        config_dir = root / BUNDLED[family]
    if not (config_dir / "model_index.json").is_file():
        raise ModelRejected(f"{path.name}: no diffusers config for a {family} checkpoint at {config_dir}")

    if family == "sdxl":
        cls, extra = StableDiffusionXLPipeline, {"add_watermarker": False}
    else:
        cls, extra = StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}
    try:
        # str(path): diffusers only memory-maps .ckpt files given as str.
        pipe = cls.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype, **extra
        )
    except (ValueError, KeyError, SingleFileComponentError) as exc:
        raise ModelRejected(f"{path.name}: does not fit the {family} config in {config_dir}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    if torch.device(device).type != "cpu":  # from_single_file already put the weights on the CPU
        pipe.to(device)

    if yaml_prediction and pipe.scheduler.config.prediction_type != yaml_prediction:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=yaml_prediction)
    elif family == "sd2" and yaml_prediction is None and config_dir != own_config and unet_predicts_v(pipe.unet):
        config_dir = root / SD2_V_CONFIG
        _use_v_config(pipe, config_dir)
    if str(device).startswith("cuda"):
        _enable_xformers(pipe)
    default_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    log.info("loaded %s (%s, %s) with %s", path.name, family, pipe.scheduler.config.prediction_type, config_dir)
    return LoadedCheckpoint(pipe, family, pipe.scheduler.config.prediction_type, default_size, config_dir)


def _enable_xformers(pipe) -> None:
    try:
        import xformers  # noqa: F401

        pipe.enable_xformers_memory_efficient_attention()
    except Exception as exc:  # noqa: BLE001 - optional accelerator: any failure means "use SDPA"
        log.warning("xformers unavailable (%s); using PyTorch SDPA attention", exc)
