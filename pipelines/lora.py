"""LoRA for one loaded pipeline: load files once, keep them, activate each request's set.

A request's ``<lora:name:w>`` / ``<lora:name:te_w:unet_w>`` tags become
:class:`LoraFile` specs (the server resolves names to files and sha256s).
:class:`LoraManager` loads each file once as a peft adapter named after its
sha256, keeps up to ``max_adapters`` of them (least recently used ones are
deleted with ``delete_adapters``), and per request activates exactly the
request's set with ``set_adapters(names, adapter_weights=[{component: weight}])``.

Adapters are never fused: a request without LoRA runs with the LoRA layers
disabled, where peft calls the original layer alone, so the output is the base
model's bit for bit (tested).  The same file twice in one request (under one
name or two) is one adapter whose weights are the sums, as A1111 applies a
network once per mention.

Formats: see :mod:`pipelines.lora_convert` (kohya, LDM-named kohya, LoCon,
diffusers/peft files; LyCORIS LoHa/LoKr/… are refused with ModelRejected).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import InvalidParameter, ModelRejected
from pipelines.lora_convert import (
    FAMILY_NAMES,
    layer_table,
    read_lora_file,
    to_peft_state_dict,
)

log = logging.getLogger(__name__)

A1111_SHORT_HASH = 12  # A1111's NetworkOnDisk.shorthash: hash[0:12]
_LIBRARIES = ("diffusers", "transformers", "peft")


@dataclass(frozen=True)
class LoraFile:
    """One LoRA of a request: a local file, its sha256, the name the prompt used, and its weights."""

    path: Path
    sha256: str
    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


@dataclass
class _Adapter:
    adapter: str  # peft adapter name
    sha256: str
    name: str  # the name it was last requested under
    components: frozenset[str]
    a1111_hash: str


class _ToDebug(logging.Handler):
    """Relays library records (load reports, peft notices) to our logger at DEBUG."""

    def emit(self, record: logging.LogRecord) -> None:
        log.debug("%s: %s", record.name, record.getMessage())


@contextmanager
def _library_chatter_at_debug():
    """While loading: diffusers/transformers/peft warnings and progress bars go to DEBUG.

    Swaps the libraries' logger handlers and transformers' progress-bar switch for
    the duration and restores them after; not meant for concurrent loads.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    saved = []
    relay = _ToDebug()
    for name in _LIBRARIES:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [relay], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        if bars:
            hf_logging.enable_progress_bar()
    for warning in caught:
        log.debug("library warning: %s", warning.message)


def _label(spec: LoraFile) -> str:
    return f"'{spec.name}' ({Path(spec.path).name})"


class LoraManager:
    """LoRA adapters of one pipeline (``family``: "sd1", "sd2" or "sdxl").

    Not thread-safe: the worker runs one job at a time on its pipeline.
    """

    def __init__(self, pipe, family: str, *, max_adapters: int = 8):
        if family not in FAMILY_NAMES:
            raise InvalidParameter(f"unknown family {family!r}; expected one of {tuple(FAMILY_NAMES)}", field="family")
        if max_adapters < 1:
            raise InvalidParameter("max_adapters must be at least 1", field="max_adapters")
        self.pipe = pipe
        self.family = family
        self.max_adapters = max_adapters
        self._adapters: OrderedDict[str, _Adapter] = OrderedDict()  # oldest first
        self._hashes: dict[str, str] = {}  # sha256 → A1111 hash, kept after eviction (tiny)
        self._table = None
        self._active = False  # LoRA layers enabled (possibly with adapters active)

    @staticmethod
    def adapter_name(sha256: str) -> str:
        """peft adapter name for a file: its content decides, not the name it was requested under."""
        return f"lora_{sha256[:16].lower()}"

    def apply(self, specs: list[LoraFile]) -> None:
        """Make exactly ``specs`` active on the pipeline (an empty list: no LoRA at all).

        Loads files not loaded yet, evicting least recently used adapters beyond
        ``max_adapters`` first (this request's own adapters are never evicted, so one
        request with more LoRAs than that holds them all until the next request).
        Raises InvalidParameter for bad weights or a LoRA for another model family,
        ModelRejected for files we cannot load; the pipeline is then left with LoRA
        off (the base model) and nothing half-loaded stays behind.
        """
        merged = self._merge(specs)
        if not merged:
            self._deactivate()
            return
        try:
            self._activate(merged)
        except BaseException:
            # A load may have changed which adapters are active: fall back to a known state.
            self._deactivate()
            raise
        log.debug("active LoRA: %s", ", ".join(f"{s.name} te={s.te_weight} unet={s.unet_weight}" for s in merged))

    def loaded(self) -> list[tuple[str, str]]:
        """(name, sha256) of every adapter held, least recently used first."""
        return [(a.name, a.sha256) for a in self._adapters.values()]

    def infotext_value(self, specs: list[LoraFile]) -> str:
        """A1111's ``Lora hashes`` value: ``"name: 0123456789ab, name2: …"``.

        As A1111 writes it: the name as the prompt mentioned it with ``:`` and ``,``
        removed, then the first 12 hex characters of A1111's LoRA hash (see
        :func:`pipelines.lora_convert.a1111_hash_of_bytes`: the metadata's
        ``sshs_model_hash``, else the sha256 of the tensor bytes after the
        safetensors header, else the file's sha256); each name once.
        """
        seen, parts = set(), []
        for spec in specs:
            alias = spec.name.replace(":", "").replace(",", "")
            if not alias or alias in seen:
                continue
            seen.add(alias)
            parts.append(f"{alias}: {self.a1111_hash(spec)[:A1111_SHORT_HASH]}")
        return ", ".join(parts)

    def a1111_hash(self, spec: LoraFile) -> str:
        """A1111's full hash of a LoRA file (computed once per sha256)."""
        if spec.sha256 not in self._hashes:
            self._hashes[spec.sha256] = read_lora_file(Path(spec.path), spec.sha256).a1111_hash
        return self._hashes[spec.sha256]

    # -- internals -------------------------------------------------------------------------

    def _merge(self, specs: list[LoraFile]) -> list[LoraFile]:
        """One spec per file (by sha256) in first-mention order, weights summed."""
        merged: dict[str, LoraFile] = {}
        for spec in specs:
            for field, value in (("te_weight", spec.te_weight), ("unet_weight", spec.unet_weight)):
                if not math.isfinite(value):
                    raise InvalidParameter(f"LoRA {_label(spec)}: {field} must be a finite number", field="prompt")
            key = spec.sha256.lower()
            if key in merged:
                first = merged[key]
                spec = LoraFile(
                    first.path, first.sha256, first.name, first.te_weight + spec.te_weight,
                    first.unet_weight + spec.unet_weight,
                )
            merged[key] = spec
        return list(merged.values())

    def _activate(self, merged: list[LoraFile]) -> None:
        self._active = True  # from here on (loading included) adapters may be live
        wanted = {self.adapter_name(s.sha256) for s in merged}
        missing = [s for s in merged if self.adapter_name(s.sha256) not in self._adapters]
        self._evict(keep=wanted, room_for=len(missing))
        for spec in missing:
            self._load(spec)
        names, weights = [], []
        for spec in merged:
            entry = self._adapters[self.adapter_name(spec.sha256)]
            entry.name = spec.name
            self._adapters.move_to_end(entry.adapter)
            names.append(entry.adapter)
            weights.append({c: spec.unet_weight if c == "unet" else spec.te_weight for c in sorted(entry.components)})
        with _library_chatter_at_debug():
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, adapter_weights=weights)

    def _deactivate(self) -> None:
        """LoRA layers off: peft then runs each wrapped layer's original module alone."""
        if self._active and any(self.pipe.get_list_adapters().values()):
            with _library_chatter_at_debug():
                self.pipe.disable_lora()
        self._active = False

    def _evict(self, *, keep: set[str], room_for: int) -> None:
        for adapter in list(self._adapters):
            if len(self._adapters) + room_for <= self.max_adapters:
                break
            if adapter in keep:
                continue
            entry = self._adapters.pop(adapter)
            with _library_chatter_at_debug():
                self.pipe.delete_adapters([adapter])
            log.info("unloaded LoRA %s (%s): over the limit of %d adapters", entry.name, entry.sha256[:12], self.max_adapters)

    def _load(self, spec: LoraFile) -> None:
        if self._table is None:
            self._table = layer_table(self.pipe, self.family)
        label = _label(spec)
        data = read_lora_file(Path(spec.path), spec.sha256)
        self._hashes[spec.sha256] = data.a1111_hash
        state_dict, components = to_peft_state_dict(data, self._table, self.family, label)
        del data
        adapter = self.adapter_name(spec.sha256)
        try:
            with _library_chatter_at_debug():
                self.pipe.load_lora_weights(state_dict, adapter_name=adapter)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            self._discard(adapter)
            if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
                raise  # not the file's fault
            raise ModelRejected(f"LoRA {label}: diffusers could not load it ({type(exc).__name__}: {exc})") from exc
        except BaseException:
            self._discard(adapter)
            raise
        self._adapters[adapter] = _Adapter(adapter, spec.sha256, spec.name, frozenset(components), self._hashes[spec.sha256])
        log.info("loaded LoRA %s as %s (%s)", label, adapter, ", ".join(sorted(components)))

    def _discard(self, adapter: str) -> None:
        """Remove whatever part of a failed load made it into the pipeline."""
        present = {a for names in self.pipe.get_list_adapters().values() for a in names}
        if adapter in present:
            with _library_chatter_at_debug():
                self.pipe.delete_adapters([adapter])
