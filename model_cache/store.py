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
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from botocore.exceptions import ClientError

from model_cache import names
from model_cache.atomic import write_bytes_atomic
from model_cache.s3 import ObjectChanged, download_file, is_not_found, parse_s3_uri
from pipelines.errors import InvalidParameter, ModelNotFound

log = logging.getLogger(__name__)


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

    def list(self, kind: str) -> list[ModelRef]: ...

    def resolve(self, kind: str, name: str, *, field: str = "name") -> ModelRef: ...

    def fetch(self, ref: ModelRef) -> Path: ...


def _not_found(kind: str, name: str, where: str, tried: list[str], field: str) -> ModelNotFound:
    tried_text = ", ".join(tried)
    also = "" if "/" in name else "; no file of that stem in sub-folders either"
    return ModelNotFound(f"{kind} model '{name}' not found in {where} (tried {tried_text}{also})", field=field)


def _match_by_stem(kind: str, name: str, refs: list[ModelRef]) -> ModelRef | None:
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

    def list(self, kind: str) -> list[ModelRef]:
        """Every model file of ``kind``, sorted by name; hidden files (downloads in progress) skipped."""
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
        found = _match_by_stem(kind, clean, self.list(kind))
        if found is not None:
            return found
        raise _not_found(kind, clean, f"{base}/", tried, field)

    def fetch(self, ref: ModelRef) -> Path:
        """Local files are used in place."""
        path = Path(ref.location)
        if not path.is_file():
            raise ModelNotFound(f"{ref.kind} model '{ref.name}' no longer exists at {path}")
        return path


class S3Store:
    """An A1111 models folder under an S3 prefix, with a local disk cache.

    Downloads land in ``cache_dir/<bucket>/<key>``; the etag and size of each cached
    object are recorded in ``cache_dir/.meta/<bucket>/<key>.etag`` (bucket names cannot
    start with ".", so the two trees never collide). A cached file is reused while the
    object's etag and size match, and downloaded again when the object changed.
    """

    def __init__(self, uri: str, client, cache_dir: Path):
        bucket, prefix = parse_s3_uri(uri, field="model_store")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket, self.prefix = bucket, prefix
        self.client = client
        self.cache_dir = Path(os.path.abspath(cache_dir))
        self.description = f"s3://{bucket}/{prefix}"
        self._locks_guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}  # one per key: bounded by the store's size

    def _kind_prefix(self, kind: str) -> str:
        return f"{self.prefix}{names.check_kind(kind)}/"

    def _ref(self, kind: str, name: str, key: str, size: int, modified, etag: str | None) -> ModelRef:
        return ModelRef(
            kind=kind,
            name=name,
            location=f"s3://{self.bucket}/{key}",
            size=int(size),
            modified=modified.timestamp(),
            etag=(etag or "").strip('"') or None,
        )

    def list(self, kind: str) -> list[ModelRef]:
        """Every model object of ``kind``, sorted by name. Keys no name could reach are skipped."""
        base = self._kind_prefix(kind)
        refs: list[ModelRef] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(base):]
                if not names.has_extension(kind, rel) or rel.rsplit("/", 1)[-1].startswith("."):
                    continue
                try:
                    names.clean_name(rel)
                except InvalidParameter:
                    log.warning("skipping S3 object with an unusable name: s3://%s/%s", self.bucket, obj["Key"])
                    continue
                refs.append(self._ref(kind, rel, obj["Key"], obj["Size"], obj["LastModified"], obj.get("ETag")))
        return sorted(refs, key=lambda ref: ref.name)

    def _head(self, kind: str, name: str) -> ModelRef | None:
        key = self._kind_prefix(kind) + name
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise
        return self._ref(kind, name, key, head["ContentLength"], head["LastModified"], head.get("ETag"))

    def resolve(self, kind: str, name: str, *, field: str = "name") -> ModelRef:
        """Find the object ``name`` means (HEAD per candidate, then a stem search), or raise ModelNotFound."""
        base = self._kind_prefix(kind)
        clean, _hash = names.clean_name(name, field=field)
        tried = names.candidates(kind, clean)
        for candidate in tried:
            ref = self._head(kind, candidate)
            if ref is not None:
                return ref
        found = _match_by_stem(kind, clean, self.list(kind))
        if found is not None:
            return found
        raise _not_found(kind, clean, f"s3://{self.bucket}/{base}", tried, field)

    def cache_path(self, bucket: str, key: str) -> Path:
        """Where ``s3://bucket/key`` lives in the disk cache."""
        return self.cache_dir / bucket / key

    def _meta_path(self, bucket: str, key: str) -> Path:
        return self.cache_dir / ".meta" / bucket / (key + ".etag")

    def _lock_for(self, location: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(location, threading.Lock())

    def fetch(self, ref: ModelRef) -> Path:
        """Local path of ``ref``'s bytes; downloads at most once per object version, even from N threads."""
        bucket, key = parse_s3_uri(ref.location, field="location")
        dest = self.cache_path(bucket, key)
        with self._lock_for(ref.location):
            if self._cached(bucket, key, dest, ref):
                return dest
            try:
                download_file(self.client, bucket, key, dest, ref.size, ref.etag)
            except ObjectChanged:
                # Overwritten since resolve(): serve the current version, as a fresh resolve would.
                log.info("%s changed since it was resolved; fetching the current version", ref.location)
                try:
                    head = self.client.head_object(Bucket=bucket, Key=key)
                except ClientError as exc:
                    if is_not_found(exc):
                        raise ModelNotFound(f"{ref.kind} model '{ref.name}' was deleted from {ref.location}") from exc
                    raise
                ref = self._ref(ref.kind, ref.name, key, head["ContentLength"], head["LastModified"], head.get("ETag"))
                if not self._cached(bucket, key, dest, ref):
                    download_file(self.client, bucket, key, dest, ref.size, ref.etag)
            self._write_meta(bucket, key, ref)
            self._fetch_sidecars(ref.kind, bucket, key)
        return dest

    def _fetch_sidecars(self, kind: str, bucket: str, key: str) -> None:
        """Bring the files that travel with a checkpoint: ``<stem>.yaml`` and ``<stem>.config/**``.

        They are small (configs, tokenizers) and decide how the checkpoint loads, so
        they are listed on every fetch and re-downloaded when their etag changed.
        """
        stem_key = key.rsplit(".", 1)[0]
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=stem_key + "."):
            for obj in page.get("Contents", []):
                side = obj["Key"]
                if side != stem_key + ".yaml" and not side.startswith(stem_key + ".config/"):
                    continue
                side_ref = self._ref(kind, side, side, obj["Size"], obj["LastModified"], obj.get("ETag"))
                dest = self.cache_path(bucket, side)
                if not self._cached(bucket, side, dest, side_ref):
                    download_file(self.client, bucket, side, dest, side_ref.size, side_ref.etag)
                    self._write_meta(bucket, side, side_ref)

    def _cached(self, bucket: str, key: str, dest: Path, ref: ModelRef) -> bool:
        try:
            size = dest.stat().st_size
            etag = self._meta_path(bucket, key).read_text().strip()
        except OSError:
            return False
        return size == ref.size and ref.etag is not None and etag == ref.etag

    def _write_meta(self, bucket: str, key: str, ref: ModelRef) -> None:
        # Written after the data file is in place: a crash in between costs a re-download, never a stale hit.
        write_bytes_atomic(self._meta_path(bucket, key), (ref.etag or "").encode())


def open_store(uri: str, *, cache_dir: Path, s3_client_factory: Callable[[], object]) -> ModelStore:
    """The store for ``uri``: ``s3://bucket/prefix/`` → :class:`S3Store`; a path or ``file://`` → :class:`LocalStore`.

    The S3 client is made only for S3 stores, so a local-only setup never needs AWS settings.
    """
    if uri.startswith("s3://"):
        return S3Store(uri, s3_client_factory(), cache_dir)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise InvalidParameter(f"model store must be s3://bucket/prefix/ or a local folder, got {uri!r}", field="model_store")
    return LocalStore(Path(uri))
