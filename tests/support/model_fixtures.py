"""Pytest plugin: tiny random-weight checkpoints laid out as an A1111 models folder.

Loaded by ``tests/conftest.py``.  The store is written once per session (a few
seconds) and shared read-only: tests that change files should copy what they
need into ``tmp_path`` (``tiny_checkpoint_copy`` does that).

    <store>/Stable-diffusion/tiny-sd1.safetensors     + tiny-sd1.config/    (seed 0)
    <store>/Stable-diffusion/tiny-sd1-b.safetensors   + tiny-sd1-b.config/  (seed 1)
    <store>/Stable-diffusion/tiny-sdxl.safetensors    + tiny-sdxl.config/   (seed 0)
    <store>/Lora/ hypernetworks/ embeddings/ VAE/ ControlNet/ annotators/   (empty)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

STORE_FOLDERS = ("Stable-diffusion", "Lora", "hypernetworks", "embeddings", "VAE", "ControlNet", "annotators")
# stem → (family, seed)
TINY_CHECKPOINTS = {
    "tiny-sd1": ("sd1", 0),
    "tiny-sd1-b": ("sd1", 1),
    "tiny-sdxl": ("sdxl", 0),
}


@pytest.fixture(scope="session")
def tiny_model_store(tmp_path_factory) -> Path:
    """Session-wide model store with the tiny checkpoints above; treat it as read-only."""
    from pipelines.tiny import write_checkpoint

    root = tmp_path_factory.mktemp("model-store")
    for name in STORE_FOLDERS:
        (root / name).mkdir()
    for stem, (family, seed) in TINY_CHECKPOINTS.items():
        write_checkpoint(root / "Stable-diffusion", stem, family, seed=seed)
    return root


@pytest.fixture(scope="session")
def tiny_sd1_checkpoint(tiny_model_store) -> Path:
    """Path of ``tiny-sd1.safetensors`` (its ``tiny-sd1.config/`` sits beside it)."""
    return tiny_model_store / "Stable-diffusion" / "tiny-sd1.safetensors"


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tiny_model_store) -> Path:
    """Path of ``tiny-sdxl.safetensors`` (its ``tiny-sdxl.config/`` sits beside it)."""
    return tiny_model_store / "Stable-diffusion" / "tiny-sdxl.safetensors"


@pytest.fixture(scope="session")
def tiny_sd2_checkpoint(tmp_path_factory) -> Path:
    """A tiny SD2 (OpenCLIP) checkpoint in its own folder, outside the shared store."""
    from pipelines.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-sd2"), "tiny-sd2", "sd2", seed=0)


@pytest.fixture
def tiny_checkpoint_copy(tiny_model_store, tmp_path):
    """Copy a store checkpoint (and its .config/) into a fresh folder: ``copy("tiny-sd1") -> Path``."""

    def copy(stem: str, dest: Path | None = None) -> Path:
        return copy_checkpoint(tiny_model_store, stem, Path(dest or tmp_path / "Stable-diffusion"))

    return copy


def copy_checkpoint(tiny_model_store: Path, stem: str, dest: Path) -> Path:
    """Copy ``<stem>.safetensors`` and its ``.config/`` from the shared tiny store into the folder ``dest``."""
    src = Path(tiny_model_store) / "Stable-diffusion"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / f"{stem}.config", dest / f"{stem}.config", dirs_exist_ok=True)
    return Path(shutil.copy2(src / f"{stem}.safetensors", dest / f"{stem}.safetensors"))


@pytest.fixture
def tiny_pipeline_factory():
    """Build an in-memory tiny diffusers pipeline: ``factory("sd1", seed=0)``."""
    from pipelines.tiny import build_tiny_pipeline

    return build_tiny_pipeline
