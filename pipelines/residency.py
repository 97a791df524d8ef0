"""Loaded checkpoints kept in memory: the torch glue around :class:`model_cache.residency.Residency`.

An entry is whatever the worker keeps per checkpoint (its pipeline and the
LoRA / hypernetwork / embedding / VAE state attached to it); ``modules_of``
lists every ``nn.Module`` the entry owns, so moving and weighing it covers the
extra networks too. On CUDA the entry in use sits in the "vram" tier and older
ones wait on the CPU in the "ram" tier; on a CPU-only machine both are the same
memory, so there is one tier ("ram") and nothing ever moves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

from torch import nn

from model_cache.residency import RAM, VRAM, Event, Residency
from pipelines import memory

log = logging.getLogger(__name__)


class PipelineCache:
    """Byte-budget LRU of loaded pipelines (see module docstring).

    ``vram_budget=None`` (or a CPU ``device``): one tier, RAM. ``on_drop(value)``
    lets the owner cut its own references before memory is released.
    """

    def __init__(self, *, device: str, ram_budget: int, vram_budget: int | None,
                 modules_of: Callable[[Any], list[nn.Module]], on_drop: Callable[[Any], None] | None = None):
        self.device = device
        on_device = not str(device).startswith("cpu") and vram_budget is not None
        self._modules_of = modules_of
        self._on_drop = on_drop
        self.shared = memory.SharedComponents()
        self.residency = Residency(
            ram_budget=ram_budget,
            device_budget=vram_budget if on_device else None,
            parts=lambda value: memory.part_sizes(modules_of(value)),
            drop=self._drop,
            to_ram=self._to_ram if on_device else None,
            to_device=self._to_device if on_device else None,
            after_drop=memory.release_memory,
        )

    @classmethod
    def for_machine(cls, *, device: str, ram_setting: str, vram_setting: str, modules_of, on_drop=None) -> PipelineCache:
        """Budgets from the settings (``"auto"``, ``"40%"``, ``"12GiB"``) resolved against this machine's RAM and GPU."""
        import psutil

        from model_cache.residency import resolve_budget

        ram = resolve_budget(ram_setting, total=psutil.virtual_memory().total, auto=memory.default_ram_budget())
        vram_auto = memory.default_vram_budget(device)
        vram = None if vram_auto is None else resolve_budget(vram_setting, total=memory.device_total(device), auto=vram_auto)
        log.info("model cache: RAM budget %d MiB, VRAM budget %s", ram >> 20,
                 "n/a (no CUDA device: the model in use counts against the RAM budget)" if vram is None else f"{vram >> 20} MiB")
        return cls(device=device, ram_budget=ram, vram_budget=vram, modules_of=modules_of, on_drop=on_drop)

    def job_record(self, key: Hashable, event: Event) -> dict:
        """The ``cache`` field of a job record: this job's event (after weighing ``key`` again) and each tier's counters."""
        refreshed = self.refresh(key)  # LoRA / VAE files loaded for the job weigh too
        out = event.as_dict()
        if refreshed is not None:
            out["evicted"] += refreshed.evicted
            out["over_budget"] = refreshed.over_budget or out["over_budget"]
        tiers = {name: {k: v for k, v in tier.items() if k != "entries"} | {"models": [e["name"] for e in tier["entries"]]}
                 for name, tier in self.residency.snapshot()["tiers"].items()}
        return {"checkpoint": out, "tiers": tiers}

    def acquire(self, key: Hashable, load: Callable[[], Any], *, estimate: int = 0, label: str | None = None) -> tuple[Any, Event]:
        """The entry for ``key`` on the device and pinned (``load()`` only when it is in no tier)."""
        return self.residency.acquire(key, load, estimate=estimate, label=label)

    def release(self, key: Hashable) -> None:
        self.residency.release(key)

    def refresh(self, key: Hashable) -> Event | None:
        return self.residency.refresh(key)

    def share(self, pipe) -> list[str]:
        """Make ``pipe`` reuse components identical to ones already loaded (call right after loading)."""
        replaced = self.shared.share(pipe)
        device = next(iter(pipe.components["unet"].parameters())).device if "unet" in pipe.components else None
        for name in replaced:  # the shared copy may wait on the CPU for a pipeline in RAM
            module = getattr(pipe, name)
            if device is not None:
                module.to(device)
        return replaced

    def snapshot(self) -> dict:
        snap = self.residency.snapshot()
        snap["device"] = self.device
        snap["shared_bytes_saved"] = self.shared.shared_bytes
        return snap

    def clear(self) -> None:
        self.residency.clear()

    # -- callbacks ----------------------------------------------------------------------------
    def _to_ram(self, value: Any, staying: list[Any]) -> None:
        # a module shared with a pipeline that stays on (or is coming to) the device stays there
        memory.move_modules(self._modules_of(value), "cpu", keep=[m for v in staying for m in self._modules_of(v)])

    def _to_device(self, value: Any) -> None:
        memory.move_modules(self._modules_of(value), self.device)

    def _drop(self, value: Any) -> None:
        if self._on_drop is not None:
            self._on_drop(value)


def attached_modules(extras) -> list[nn.Module]:
    """Modules held by a worker's extra-network managers outside the pipeline's components.

    The VAE manager keeps the checkpoint's own VAE and recently used VAE files; the
    hypernetwork manager keeps MLPs of recently used files. Read through their
    caches (private attributes; duck-typed so a manager without one is skipped).
    """
    if extras is None:
        return []
    out: list[nn.Module] = []
    vae = getattr(extras, "vae", None)
    if vae is not None:
        out.append(getattr(vae, "own", None))
        out.extend(getattr(vae, "_cache", {}).values())
    hypernets = getattr(extras, "hypernets", None)
    for net in getattr(hypernets, "_cache", {}).values():
        for pair in getattr(net, "layers", {}).values():
            out.extend(pair)
    return [m for m in out if isinstance(m, nn.Module)]


__all__ = ["RAM", "VRAM", "PipelineCache", "attached_modules"]
