"""The model store: A1111's models folder, on local disk or under an S3 prefix.

Both backends answer the same three questions — what is there (``list``), which file
does this user-given name mean (``resolve``), and where is it on local disk
(``fetch``) — so the rest of the server never checks which one it has.

Layout (A1111's)::

    <store>/Stable-diffusion/  Lora/  hypernetworks/  embeddings/  VAE/  ControlNet/  annotators/

Name resolution follows A1111: an exact relative path (with or without extension,
with or without a `` [hash]`` title suffix) first; failing that, a bare name matches
a file of that stem in any sub-folder (``<lora:foo:1>`` finds ``Lora/styles/foo.safetensors``).
Names are validated by :func:`model_cache.names.clean_name` before any I/O.

Both also answer the cache questions: ``job_scope()`` (a ``with`` block around a job: what
it fetched stays pinned on disk until it ends), ``cache_stats()`` and ``cache_snapshot()``.
The S3 backend (:mod:`model_cache.s3_store`) reads through the disk tier
(:mod:`model_cache.disk`); local files are used in place. Explicit locations
(``resolve_uri``) must lie under the allowed S3 prefixes (:mod:`model_cache.access`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from model_cache import names
from model_cache.access import S3AllowList
from model_cache.disk import DiskCache
from model_cache.integrity import check_safetensors
from model_cache.refs import ModelRef, ModelStore, match_by_stem, not_found
from model_cache.s3_store import S3Store
from model_cache.transfer import TransferConfig
from pipelines.errors import Forbidden, InvalidParameter, ModelNotFound

__all__ = ["LocalStore", "ModelRef", "ModelStore", "S3Store", "list_all", "open_store"]

log = logging.getLogger(__name__)


class LocalStore:
    """A local A1111 models folder. Symlinked files and folders inside it are followed
    (users symlink model folders from other disks); names themselves can never escape."""

    def __init__(self, root: Path):
        self.root = Path(os.path.abspath(root))
        self.description = f"local folder {self.root}"
        if not self.root.is_dir():
            log.warning("model store %s does not exist (yet); it will look empty", self.root)

    def _kind_dir(self, kind: str) -> Path:
        return self.root / names.check_kind(kind)

    def _ref(self, kind: str, name: str, path: Path, stat: os.stat_result) -> ModelRef:
        return ModelRef(kind=kind, name=name, location=str(path), size=stat.st_size, modified=stat.st_mtime)

    def list(self, kind: str, *, fresh: bool = False) -> list[ModelRef]:
        """Every model file of ``kind``, sorted by name; hidden files (downloads in progress) skipped.
        (Always read from the folder: ``fresh`` is for the S3 store's memo.)"""
        base = self._kind_dir(kind)
        refs: list[ModelRef] = []
        seen_dirs: set[tuple[int, int]] = set()  # followlinks=True can loop on a cyclic symlink
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            try:
                st = os.stat(dirpath)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen_dirs:
                dirnames[:] = []
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for filename in filenames:
                if filename.startswith(".") or not names.has_extension(kind, filename):
                    continue
                path = Path(dirpath) / filename
                try:
                    stat = path.stat()  # follows symlinks: size of the real file
                except OSError:
                    continue  # a dangling symlink is not a model
                rel = path.relative_to(base).as_posix()
                refs.append(self._ref(kind, rel, path, stat))
        return sorted(refs, key=lambda ref: ref.name)

    def resolve(self, kind: str, name: str, *, field: str = "name") -> ModelRef:
        """Find the file ``name`` means, or raise ModelNotFound saying where we looked."""
        base = self._kind_dir(kind)
        clean, _hash = names.clean_name(name, field=field)
        tried = names.candidates(kind, clean)
        for candidate in tried:
            path = base / candidate
            # clean_name already refuses "..", so this holds lexically; keep it as a guard.
            if not os.path.normpath(path).startswith(str(base) + os.sep):
                raise InvalidParameter(f"model name {name!r} leaves the store", field=field)
            try:
                stat = path.stat()
            except OSError:
                continue
            if path.is_file():
                return self._ref(kind, candidate, path, stat)
        found = match_by_stem(kind, clean, self.list(kind))
        if found is not None:
            return found
        raise not_found(kind, clean, f"{base}/", tried, field)

    def fetch(self, ref: ModelRef) -> Path:
        """Local files are used in place (never deleted); a broken safetensors header is refused naming the file."""
        path = Path(ref.location)
        if not path.is_file():
            raise ModelNotFound(f"{ref.kind} model '{ref.name}' no longer exists at {path}")
        if path.name.lower().endswith(".safetensors"):
            check_safetensors(path, name=f"{ref.kind}/{ref.name}")
        return path

    def resolve_uri(self, kind: str, uri: str, *, field: str = "models") -> ModelRef:
        """Explicit S3 locations need an S3 model store; refused before any I/O."""
        S3AllowList([]).check(uri, field=field)  # syntax errors → 422, anything else → 403
        raise Forbidden(f"explicit S3 model locations need MODEL_STORE on S3 (got {uri})", field=field)  # pragma: no cover

    def job_scope(self):
        """Nothing to pin: local files are used in place and never evicted."""
        return nullcontext()

    def explicit(self, models):
        """Explicit S3 locations have no disk tier to go through here (requests are refused earlier too)."""
        for item in getattr(models, "items", ()):
            raise Forbidden(f"{item.field}: explicit S3 model locations need MODEL_STORE on S3 (got {item.uri})", field=item.field)
        return nullcontext(self)

    def cache_snapshot(self) -> list[dict]:
        """A local store has no disk tier: models are used where they are."""
        return []

    def cache_stats(self) -> dict:
        return {"tier": "local", "root": str(self.root)}


def list_all(store: ModelStore) -> dict[str, list[ModelRef]]:
    """Every model of every A1111 kind (``{kind: [ModelRef(name, size, modified, ...)]}``), for listings."""
    return {kind: store.list(kind) for kind in names.MODEL_KINDS}


def open_store(
    uri: str,
    *,
    cache_dir: Path,
    s3_client_factory: Callable[[], object],
    disk_budget: int | None = None,
    min_free: int | None = None,
    transfer_config: TransferConfig | None = None,
    allowed_s3_prefixes: list[str] | tuple[str, ...] = (),
    metadata_ttl: float = 0.0,
) -> ModelStore:
    """The store for ``uri``: ``s3://bucket/prefix/`` → :class:`S3Store`; a path or ``file://`` → :class:`LocalStore`.

    The S3 client (and the disk tier, with its start-up sweep) is made only for S3 stores,
    so a local-only setup never needs AWS settings. ``disk_budget`` / ``min_free`` ``None``
    mean "derive from the disk" (see :mod:`model_cache.disk`).
    """
    if uri.startswith("s3://"):
        disk = DiskCache(Path(cache_dir), budget=disk_budget, min_free=min_free)
        return S3Store(
            uri, s3_client_factory(), cache_dir, disk=disk, transfer=transfer_config, allowed_prefixes=allowed_s3_prefixes,
            metadata_ttl=metadata_ttl,
        )
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise InvalidParameter(f"model store must be s3://bucket/prefix/ or a local folder, got {uri!r}", field="model_store")
    return LocalStore(Path(uri))
