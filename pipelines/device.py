"""Device and dtype choices, and giving memory back: the torch side of the worker's set-up.

Kept here so the server package never touches torch itself; the worker asks
for plain names and gets torch objects back.
"""

from __future__ import annotations

import gc

import torch


def resolve_device(setting: str) -> str:
    """``"auto"`` → ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else as given."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    """``"auto"`` → float16 on CUDA, float32 on CPU (CPU half precision is slow and lossy); else the named dtype."""
    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, setting)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"`` (for records and logs)."""
    return str(dtype).removeprefix("torch.")


def torch_version() -> str:
    return torch.__version__


def release_memory() -> None:
    """Collect dropped models now and hand cached GPU blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
