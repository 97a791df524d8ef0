"""``override_settings.sd_vae``: which VAE decodes, and switching it on a loaded pipeline.

A1111 (1.x ``modules/sd_vae.py``) lists VAEs by file *name* (basename with
extension, natural-sorted) from ``models/VAE/**`` (``.ckpt``, ``.pt``,
``.safetensors``) plus ``*.vae.*`` files beside the checkpoints, and resolves:

* ``"None"`` → the checkpoint's own VAE;
* ``"Automatic"`` (or the legacy ``"auto"``) → the first listed VAE whose name
  *starts with* the checkpoint's stem, else the checkpoint's own;
* any other value → the VAE of that name (A1111 falls back to the own VAE with a
  console message; we answer 404, as the design asks for unknown names).

:func:`choose_vae` does this on names.  One deliberate refinement: for
"Automatic" an exact match (``<stem>.vae.pt``, ``.vae.ckpt``, ``.vae.safetensors``
— A1111's pre-1.0 lookup order — then ``<stem>.safetensors``/``.pt``/``.ckpt``/a
folder ``<stem>``) wins over a prefix match, so ``model.vae.pt`` is chosen for
``model`` even when ``model-a.vae.pt`` sorts first (A1111 would take the latter).
Named VAEs may also be given without their extension.

Infotext: ``VAE hash`` is the file's sha256[:10] and ``VAE`` its name, both
left out when the checkpoint's own VAE decodes (A1111 1.x).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import torch

from pipelines.errors import ModelNotFound, ModelRejected

log = logging.getLogger(__name__)

VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
SHORTHASH_LEN = 10
_AUTOMATIC = {"automatic", "auto"}
_EXACT_SUFFIXES = (".vae.pt", ".vae.ckpt", ".vae.safetensors", ".safetensors", ".pt", ".ckpt", ".vae", "")
_IGNORED = ("loss", "model_ema.")  # A1111 drops these keys from VAE files


def natural_key(text: str) -> list:
    """A1111's natural sort key: digit runs compare as numbers, the rest case-insensitively."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _basename(entry: str) -> str:
    return PurePosixPath(entry.replace("\\", "/")).name


def _strip_suffix(name: str) -> str:
    for suffix in (".vae.safetensors", ".vae.ckpt", ".vae.pt", *VAE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def choose_vae(setting: str | None, checkpoint_stem: str, available: list[str]) -> str | None:
    """The VAE to use, as an entry of ``available`` (names relative to ``VAE/``), or None for the checkpoint's own.

    ``setting`` is ``override_settings.sd_vae``; None or "" mean "Automatic"
    (A1111's default).  Raises ModelNotFound for a named VAE that is not there.
    """
    value = (setting or "Automatic").strip()
    if value.lower() == "none":
        return None
    entries = sorted(available, key=lambda e: natural_key(_basename(e)))
    if value.lower() in _AUTOMATIC:
        by_name = {}
        for entry in entries:
            by_name.setdefault(_basename(entry), entry)
        for suffix in _EXACT_SUFFIXES:
            if f"{checkpoint_stem}{suffix}" in by_name:
                return by_name[f"{checkpoint_stem}{suffix}"]
        return next((e for e in entries if _basename(e).startswith(checkpoint_stem)), None)
    for matches in (
        lambda e: e == value,
        lambda e: _basename(e) == value,
        lambda e: _strip_suffix(_basename(e)) == value,
    ):
        found = [e for e in entries if matches(e)]
        if found:
            return found[0]
    raise ModelNotFound(f"VAE {value!r} not found in VAE/ ({len(available)} available)", field="sd_vae")


def infotext_params(name: str | None, sha256: str | None) -> dict[str, object]:
    """``{"VAE hash": sha256[:10], "VAE": name}`` for a VAE file, ``{}`` for the checkpoint's own VAE."""
    if not name:
        return {}
    return {"VAE hash": sha256[:SHORTHASH_LEN] if sha256 else None, "VAE": name}


def _read_vae_state(path: Path) -> dict[str, torch.Tensor]:
    from pipelines.checkpoint import read_state_dict

    if path.suffix.lower() not in VAE_SUFFIXES:
        raise ModelRejected(f"{path.name}: not a VAE file (expected {', '.join(VAE_SUFFIXES)} or a diffusers folder)")
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(_IGNORED)}
    if not any(k.startswith(("encoder.", "decoder.", "first_stage_model.", "vae.")) for k in state):
        raise ModelRejected(f"{path.name}: not a VAE (no encoder/decoder weights; keys: {sorted(state)[:4]})")
    return state


class VaeManager:
    """Switches ``pipe.vae`` between the checkpoint's own VAE and VAE files, cached by sha256 (LRU).

    ``config_dir`` is the pipeline's diffusers config folder (``LoadedCheckpoint.config_dir``);
    single-file VAEs are built with its ``vae/`` config.  Without it, the own
    VAE's config is written once to a private temporary folder.  Not thread-safe.
    """

    def __init__(self, pipe, family: str, *, config_dir: str | os.PathLike | None = None, max_cached: int = 2):
        self.pipe = pipe
        self.family = family
        self.max_cached = max_cached
        self.own = pipe.vae
        self.current: tuple[str, str] | None = None  # (name, sha256) of the VAE file in use
        self._config_dir = Path(config_dir) if config_dir else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._cache: OrderedDict[str, object] = OrderedDict()

    def _config_root(self) -> str:
        if self._config_dir is not None and (self._config_dir / "vae" / "config.json").is_file():
            return str(self._config_dir)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sd-vae-config-")
            self.own.save_config(Path(self._tmp.name) / "vae")
        return self._tmp.name

    def _load(self, path: Path):
        from diffusers import AutoencoderKL
        from diffusers.loaders.single_file_utils import SingleFileComponentError

        try:
            if path.is_dir():
                sub = "vae" if (path / "vae" / "config.json").is_file() else None
                vae = AutoencoderKL.from_pretrained(str(path), subfolder=sub, local_files_only=True)
            else:
                state = _read_vae_state(path)
                vae = AutoencoderKL.from_single_file(state, config=self._config_root(), subfolder="vae",
                                                     local_files_only=True)
        except (ValueError, KeyError, OSError, NotImplementedError, SingleFileComponentError) as exc:
            # NotImplementedError: weights missing from the file stay on the meta device.
            raise ModelRejected(f"{path.name}: does not fit this {self.family} model's VAE: {exc}") from exc
        own = self.own.config
        # Same latent space and downscaling factor, or the UNet's latents cannot be decoded.
        if vae.config.latent_channels != own.latent_channels or len(vae.config.block_out_channels) != len(
            own.block_out_channels
        ):
            raise ModelRejected(
                f"{path.name}: VAE with {vae.config.latent_channels} latent channels and "
                f"{len(vae.config.block_out_channels)} blocks does not fit this {self.family} model's "
                f"({own.latent_channels} channels, {len(own.block_out_channels)} blocks)")
        return vae.eval().requires_grad_(False)

    def apply(self, path: str | os.PathLike | None, sha256: str = "") -> None:
        """Decode with the VAE at ``path`` (file or diffusers folder), or with the checkpoint's own when None.

        The VAE switched to takes the device and dtype of the one it replaces
        (so a ``pipe.to(...)`` made meanwhile carries over).  Raises
        ModelRejected (naming the file) when it does not fit the model.
        """
        reference = self.pipe.vae  # whatever decodes now carries the pipeline's device and dtype
        if path is None:
            self.pipe.vae = self.own.to(device=reference.device, dtype=reference.dtype)
            self.current = None
            return
        path = Path(path)
        if not path.exists():
            raise ModelNotFound(f"{path.name}: no such VAE ({path})")
        key = sha256 or str(path.resolve())
        vae = self._cache.pop(key, None)
        if vae is None:
            vae = self._load(path)
            log.info("loaded VAE %s", path.name)
        vae.to(device=reference.device, dtype=reference.dtype)
        self._cache[key] = vae
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        self.pipe.vae = vae
        self.current = (path.name, sha256)

    def infotext_params(self) -> dict[str, object]:
        """A1111's ``VAE hash`` / ``VAE`` for the VAE in use (``{}`` when it is the checkpoint's own)."""
        return infotext_params(*self.current) if self.current else {}

    def cached(self) -> list[str]:
        """Keys (sha256) of the VAEs held in memory, least recently used first."""
        return list(self._cache)
