"""What a model store hands out (:class:`ModelRef`), what it must answer (:class:`ModelStore`), and the
A1111 lookup rules both backends share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from model_cache import names
from pipelines.errors import ModelNotFound


@dataclass(frozen=True)
class ModelRef:
    """One model file in a store. ``name`` is relative to the kind's folder, "/"-separated, with extension."""

    kind: str
    name: str
    location: str  # absolute local path, or s3://bucket/key
    size: int
    modified: float  # POSIX timestamp
    etag: str | None = None  # S3 only: identifies the object version we saw


@runtime_checkable
class ModelStore(Protocol):
    """What the rest of the server needs from a model store."""

    description: str

    def list(self, kind: str, *, fresh: bool = False) -> list[ModelRef]: ...

    def resolve(self, kind: str, name: str, *, field: str = "name") -> ModelRef: ...

    def fetch(self, ref: ModelRef) -> Path: ...

    def job_scope(self): ...

    def explicit(self, models): ...

    def cache_snapshot(self) -> list[dict]: ...

    def cache_stats(self) -> dict: ...


def not_found(kind: str, name: str, where: str, tried: list[str], field: str) -> ModelNotFound:
    tried_text = ", ".join(tried)
    also = "" if "/" in name else "; no file of that stem in sub-folders either"
    return ModelNotFound(f"{kind} model '{name}' not found in {where} (tried {tried_text}{also})", field=field)


def match_by_stem(kind: str, name: str, refs: list[ModelRef]) -> ModelRef | None:
    """A1111's fallback: a bare name (no "/") matches a file with that stem, or that basename, anywhere.

    Several matches: the shallowest path wins, then alphabetical order, so the answer
    is stable no matter the listing order.
    """
    if "/" in name:
        return None
    if names.has_extension(kind, name):
        matches = [ref for ref in refs if ref.name.rsplit("/", 1)[-1] == name]
    else:
        matches = [ref for ref in refs if names.stem(ref.name) == name]
    if not matches:
        return None
    return min(matches, key=lambda ref: (ref.name.count("/"), ref.name))
