"""The torch side of the model cache: weigh, move, share and really free loaded pipelines.

* :func:`module_bytes` / :func:`part_sizes`: bytes of parameters and buffers,
  each storage counted once (tied weights, shared modules).
* :func:`move_modules`: move modules between the device and the CPU, leaving
  alone those another resident pipeline still uses on the device.
* :class:`SharedComponents`: identical components (the same VAE baked into two
  checkpoints) become one module: a cheap fingerprint finds candidates, an
  exact tensor-by-tensor comparison decides.
* :func:`release_memory`: after a drop, collect cycles, give CUDA's cached
  blocks back, and on glibc ``malloc_trim(0)`` so freed heap pages return to
  the OS (glibc keeps them otherwise, which is how RSS "leaks" after a switch).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import hashlib
import logging
import os
import platform
import weakref
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

# components that nothing mutates in place (LoRA, embeddings and hypernetworks change the
# UNet and text encoders), so one module can serve every pipeline that has it
SHAREABLE = ("vae",)
_SAMPLES = 16  # elements sampled per tensor for the fingerprint


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each underlying storage counted once."""
    seen: dict[int, int] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def pipeline_modules(pipe) -> list[nn.Module]:
    """The ``nn.Module`` components of a diffusers pipeline (UNet, VAE, text encoders, ControlNets, …)."""
    return [m for m in pipe.components.values() if isinstance(m, nn.Module)]


def unique_modules(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """``modules`` without repeats (by identity), order kept."""
    out, seen = [], set()
    for module in modules:
        if module is not None and id(module) not in seen:
            seen.add(id(module))
            out.append(module)
    return out


def part_sizes(modules: Iterable[nn.Module]) -> dict[int, int]:
    """``{id(module): bytes}`` for the model cache's accounting (a shared module is one part)."""
    return {id(m): module_bytes(m) for m in unique_modules(modules)}


def move_modules(modules: Iterable[nn.Module], device: str, *, keep: Iterable[nn.Module] = ()) -> None:
    """Move each module to ``device``, except those in ``keep`` (still needed where they are)."""
    kept = {id(m) for m in keep}
    target = torch.device(device)
    for module in unique_modules(modules):
        if id(module) in kept:
            continue
        module.to(target)
    if target.type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def fingerprint(module: nn.Module) -> str:
    """A cheap identity candidate: class, names, shapes, dtypes and a few sampled values of every tensor.

    Equal fingerprints are only a hint; :func:`identical` decides.
    """
    h = hashlib.sha256(type(module).__qualname__.encode())
    with torch.no_grad():
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            flat = tensor.detach().reshape(-1)
            if flat.numel():
                step = max(1, flat.numel() // _SAMPLES)
                sample = flat[::step][:_SAMPLES].to("cpu").contiguous()
                h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def identical(a: nn.Module, b: nn.Module) -> bool:
    """True when both modules have the same class, tensor names, dtypes and values (exactly)."""
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    with torch.no_grad():
        # one tensor at a time crosses devices (a copy in RAM may match one on the GPU)
        return all(sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k].device))
                   for k in sa)


class SharedComponents:
    """Registry of shareable components by fingerprint; holds them weakly (dropping every pipeline frees them)."""

    def __init__(self, names: Iterable[str] = SHAREABLE):
        self.names = tuple(names)
        self._by_print: dict[str, weakref.ReferenceType] = {}
        self.shared_bytes = 0  # bytes not loaded twice thanks to sharing, since start-up

    def share(self, pipe) -> list[str]:
        """Replace ``pipe``'s shareable components by identical ones already registered; returns the names replaced.

        Call right after loading, before anything else holds the pipeline's components.
        """
        replaced = []
        for name in self.names:
            module = getattr(pipe, name, None)
            if not isinstance(module, nn.Module):
                continue
            key = fingerprint(module)
            ref = self._by_print.get(key)
            other = ref() if ref is not None else None
            if other is not None and other is not module and identical(other, module):
                setattr(pipe, name, other)  # register_modules through the pipeline's __setattr__
                self.shared_bytes += module_bytes(module)
                replaced.append(name)
                log.info("cache: %s identical to one already loaded; sharing it (%d MiB saved)", name, module_bytes(module) >> 20)
            else:
                self._by_print[key] = weakref.ref(module)
        self._by_print = {k: r for k, r in self._by_print.items() if r() is not None}
        return replaced


@functools.cache
def _libc():
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def malloc_trim() -> bool:
    """Return free heap pages to the OS (glibc ``malloc_trim(0)``); False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))


def release_memory() -> None:
    """Collect dropped models now, hand cached GPU blocks back to the driver and free heap pages to the OS."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    malloc_trim()


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def default_ram_budget(fraction: float = 0.5) -> int:
    """``fraction`` of the machine's total RAM (cgroup limits included where psutil sees them)."""
    import psutil

    return int(psutil.virtual_memory().total * fraction)


def default_vram_budget(device: str, reserve_fraction: float = 0.2, min_reserve: int = 2 << 30) -> int | None:
    """Device memory free now minus a reserve for activations (≥ 2 GiB or 20 % of the card); None without CUDA."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return max(0, free - max(min_reserve, int(total * reserve_fraction)))


def device_total(device: str) -> int:
    """Total memory of a CUDA device (0 for anything else)."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return 0
    return torch.cuda.mem_get_info(torch.device(device))[1]


def estimate_bytes(path, dtype: torch.dtype) -> int:
    """Bytes a checkpoint will take once loaded at ``dtype``: element counts from a ``.safetensors`` header
    (EMA copies skipped, as the loader skips them), else the file size."""
    import json
    import struct

    size = os.path.getsize(path)
    if not str(path).endswith(".safetensors"):
        return size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return size
    numel = 0
    for key, info in header.items():
        if key == "__metadata__" or key.startswith("model_ema.") or not isinstance(info, dict):
            continue
        count = 1
        for d in info.get("shape", []):
            count *= d
        numel += count
    return numel * torch.tensor([], dtype=dtype).element_size()
