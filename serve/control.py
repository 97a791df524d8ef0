"""ControlNet units on the worker side: models from the store, preprocessors, hook, records.

For each enabled unit of a job (already validated by :mod:`pipelines.control_units`
in the HTTP process): resolve its ``model`` in the store's ``ControlNet/`` folder,
load it (once per file sha256, kept in the worker's model cache beside the
checkpoints: the same RAM/VRAM byte budgets, LRU, pinned while a job uses it),
check it fits the checkpoint,
run its preprocessor (annotator files from the store's ``annotators/``), bring the
detected map to the generation size, and collect what the infotext and
``params.json`` record.  :meth:`PreparedControl.hook` then injects the units into
the pipeline's UNet for the duration of the generation.

Imported only in the worker; the torch world is imported lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.control_units import (
    CONTROL_MODES,
    ControlUnit,
    fit_to_canvas,
    infotext_value,
    pixel_perfect_res,
)
from pipelines.errors import ModelNotFound

log = logging.getLogger(__name__)

KIND = "ControlNet"
ANNOTATORS = "annotators"
# A1111's old 8-hex "model hash" (the one the extension shows in model titles): sha256 of 64 KiB at 1 MiB.
_LEGACY_OFFSET, _LEGACY_SIZE = 0x100000, 0x10000


def legacy_hash(path: Path) -> str:
    """The short hash sd-webui-controlnet puts in model titles (``control_v11p_sd15_canny [d14c016b]``)."""
    with open(path, "rb") as f:
        f.seek(_LEGACY_OFFSET)
        return hashlib.sha256(f.read(_LEGACY_SIZE)).hexdigest()[:8]


@dataclass
class PreparedControl:
    """A job's units, ready: hook units for the pipeline, maps to return, infotext and records."""

    units: list[Any] = field(default_factory=list)  # pipelines.control_hook.HookUnit
    maps: list[tuple[str, bytes]] = field(default_factory=list)  # (file name, PNG) of saved detected maps
    infotext: dict[str, str] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    calls: list[Any] = field(default_factory=list)  # the hook's per-call record, when asked for

    def hook(self, pipe, *, record: bool = False):
        """``with prepared.hook(pipe):`` around the generation (a no-op without units)."""
        if not self.units:
            return contextlib.nullcontext()
        from pipelines.control_hook import ControlHook

        hook = ControlHook(pipe, self.units, record=record)
        self.calls = hook.calls
        return hook


class ControlNets:
    """The worker's ControlNet models and preprocessors (one per engine, lives as long as it)."""

    def __init__(self, store, hashes, *, device: str, dtype, models):
        """``models``: the worker's :class:`pipelines.residency.PipelineCache` (``acquire``/``release``)."""
        from pipelines.preprocess import Preprocessors

        self.store, self.hashes, self.device, self.dtype = store, hashes, device, dtype
        self.models = models
        self.preprocessors = Preprocessors(self._annotator, device=device)
        self.loads = 0  # ControlNet files read from disk (the rest were cache hits)
        self.events: list[dict] = []  # the current job's cache events, for job.json
        self._pinned: list[tuple] = []

    def release(self) -> None:
        """Unpin the models the previous job used (they stay cached and may now be evicted)."""
        pinned, self._pinned = self._pinned, []
        for key in pinned:
            self.models.release(key)
        self.events = []

    def _load(self, path: Path, sha256: str, label: str):
        """The loaded ControlNet for ``path``, from the cache or the file, pinned until :meth:`release`."""
        from pipelines.controlnet import load_controlnet
        from pipelines.memory import estimate_bytes

        def read():
            self.loads += 1
            return load_controlnet(path, device=self.device, dtype=self.dtype)

        key = (KIND, sha256, str(self.device), str(self.dtype))
        loaded, event = self.models.acquire(key, read, estimate=estimate_bytes(path, self.dtype), label=f"{KIND}/{label}")
        self._pinned.append(key)
        self.events.append(event.as_dict())
        return loaded

    def _annotator(self, file_name: str) -> Path:
        ref = self.store.resolve(ANNOTATORS, file_name, field=f"{ANNOTATORS}/{file_name}")
        return self.store.fetch(ref)

    def _model_file(self, unit: ControlUnit):
        """(ref, local path) of the unit's model; a diffusers folder is named by the folder."""
        where = unit.field("model")
        try:
            ref = self.store.resolve(KIND, unit.model, field=where)
        except ModelNotFound as first:
            from model_cache.names import split_hash

            folder = split_hash(unit.model)[0].strip().rstrip("/")
            try:
                ref = self.store.resolve(KIND, f"{folder}/diffusion_pytorch_model", field=where)
            except ModelNotFound:
                raise first from None
        return ref, self.store.fetch(ref)

    def prepare(self, units: list[ControlUnit], *, pipe, family: str, checkpoint: str, width: int, height: int,
                seed: int, init_image: bytes | None = None) -> PreparedControl:
        """Load, check and preprocess every unit (see the module docstring)."""
        out = PreparedControl()
        if not units:
            return out
        from pipelines.control_hook import HookUnit, hint_tensor
        from pipelines.controlnet import FAMILY_NAMES, check_compatible
        from pipelines.image_input import from_png_bytes, to_png_bytes

        for unit in units:
            ref, path = self._model_file(unit)
            sha256, _short = self.hashes.file_hashes(path)
            loaded = self._load(path, sha256, Path(ref.name).stem)
            title = f"{Path(ref.name).stem} [{legacy_hash(path)}]"
            check_compatible(loaded, pipe.unet, family, name=title, checkpoint=checkpoint, field=unit.field("model"))
            source = from_png_bytes(unit.image if unit.image is not None else init_image).convert("RGB")
            res = pixel_perfect_res(source.size, width, height, unit.resize_mode) if unit.pixel_perfect else unit.effective_processor_res()
            detected = self.preprocessors.run(unit.module, source, processor_res=res, threshold_a=unit.threshold_a,
                                              threshold_b=unit.threshold_b, field=unit.field("module"), seed=seed)
            canvas = fit_to_canvas(detected, width, height, unit.resize_mode)
            out.units.append(HookUnit(index=unit.index, controlnet=loaded.model, hint=hint_tensor(canvas, device=self.device, dtype=self.dtype),
                                      weight=unit.weight, guidance_start=unit.guidance_start, guidance_end=unit.guidance_end,
                                      mode=CONTROL_MODES.index(unit.control_mode), source=detected, resize_mode=unit.resize_mode,
                                      hr_option=unit.hr_option, soft_in_hires=unit.module in ("canny", "mlsd")))
            uses_res = _uses_resolution(unit.module)
            out.infotext[f"ControlNet {unit.index}"] = infotext_value(unit, title, res if uses_res else None)
            a, b = unit.thresholds()
            record = {
                **unit.record(),
                "model": title,
                "model_file": {"name": ref.name, "location": ref.location, "sha256": sha256, "hash": title[-9:-1],
                               "family": FAMILY_NAMES.get(loaded.family, loaded.family), "layout": loaded.layout},
                "processor_res": res if uses_res else None,
                "threshold_a": a,
                "threshold_b": b,
                "image_source": "unit" if unit.image is not None else "init_images",
            }
            if unit.save_detected_map:
                name = f"controlnet-{unit.index}-{unit.module}.png"
                out.maps.append((name, to_png_bytes(canvas)))
                record["detected_map"] = name
            out.records.append(record)
        log.info("ControlNet units ready: %s", ", ".join(f"{r['index']}:{r['module']}/{r['model']}" for r in out.records))
        return out


def _uses_resolution(module: str) -> bool:
    from pipelines.preprocess_names import SPECS

    return SPECS[module].uses_resolution


def prepare_for_job(engine, job, active, prepared) -> PreparedControl:
    """The executor's one call: units of ``job`` prepared for ``active``; infotext/records/warnings merged into ``prepared``.

    Builds ``engine.controlnets`` on first use. Jobs without units cost nothing.
    """
    units = list(getattr(job, "controlnet_units", None) or [])
    if not units:
        return PreparedControl()
    if getattr(engine, "controlnets", None) is None:
        engine.controlnets = ControlNets(engine.store, engine.hashes, device=engine.device, dtype=engine.dtype, models=engine.models())
    p = job.params
    control = engine.controlnets.prepare(
        units, pipe=active.loaded.pipe, family=active.loaded.family, checkpoint=active.name, width=p.width, height=p.height,
        seed=p.seeds[0], init_image=getattr(p, "init_image", None) or None,
    )
    prepared.infotext.update(control.infotext)
    prepared.records["controlnet"] = control.records
    prepared.warnings.extend(control.warnings)
    return control
