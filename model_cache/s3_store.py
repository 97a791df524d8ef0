"""The S3 backend of the model store: an A1111 models folder under an S3 prefix, read through a disk tier.

Single-flight per object (one lock per key), downloads by :mod:`model_cache.transfer`
(parallel ranged GETs, verified, atomic), space by :class:`model_cache.disk.DiskCache`
(budget, LRU, pins), locations fenced by :class:`model_cache.access.S3AllowList`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from botocore.exceptions import ClientError

from model_cache import names, transfer
from model_cache.access import S3AllowList
from model_cache.atomic import write_bytes_atomic
from model_cache.disk import DiskCache
from model_cache.explicit import ExplicitModels
from model_cache.integrity import check_safetensors
from model_cache.memo import MetadataMemo
from model_cache.refs import ModelRef, match_by_stem, not_found
from model_cache.s3 import ObjectChanged, is_not_found, parse_s3_uri
from model_cache.transfer import TransferConfig
from pipelines.errors import InvalidParameter, ModelNotFound, ModelRejected

log = logging.getLogger(__name__)


class S3Store:
    """An A1111 models folder under an S3 prefix, with a budgeted local disk tier.

    Downloads land in ``cache_dir/<bucket>/<key>``; the etag of each cached object is
    recorded in ``cache_dir/.meta/<bucket>/<key>.etag`` (bucket names cannot start with
    ".", so the two trees never collide). A cached file is reused while the object's etag
    and size match and its safetensors header is sound, and downloaded again otherwise.
    The :class:`~model_cache.disk.DiskCache` decides what stays (budget, LRU, pins).
    """

    def __init__(
        self,
        uri: str,
        client,
        cache_dir: Path,
        *,
        disk: DiskCache | None = None,
        transfer: TransferConfig | None = None,
        allowed_prefixes: list[str] | tuple[str, ...] = (),
        metadata_ttl: float = 0.0,
    ):
        bucket, prefix = parse_s3_uri(uri, field="model_store")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket, self.prefix = bucket, prefix
        self.client = client
        self.cache_dir = Path(os.path.abspath(cache_dir))
        self.description = f"s3://{bucket}/{prefix}"
        # The store's own prefix is always readable; ALLOWED_S3_PREFIXES may add more.
        self.allow = S3AllowList([self.description, *allowed_prefixes])
        self.disk = disk if disk is not None else DiskCache(self.cache_dir)
        self.transfer = transfer or TransferConfig()
        self._locks_guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}  # one per key: bounded by the store's size
        # One thread fsyncs finished downloads in the background: the file is usable at once,
        # durable a little later (the disk tier removes what was not, at the next start).
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disk-sync")
        self.memo = MetadataMemo(metadata_ttl)  # listings and name lookups, reused for metadata_ttl seconds
        self._job = threading.local()  # per-thread: the running job's explicit locations (see explicit())
        self._adopt()

    # -- listing and names ---------------------------------------------------------------
    def _kind_prefix(self, kind: str) -> str:
        return f"{self.prefix}{names.check_kind(kind)}/"

    def _ref(self, kind: str, name: str, key: str, size: int, modified, etag: str | None, bucket: str | None = None) -> ModelRef:
        return ModelRef(
            kind=kind,
            name=name,
            location=f"s3://{bucket or self.bucket}/{key}",
            size=int(size),
            modified=modified.timestamp(),
            etag=(etag or "").strip('"') or None,
        )

    @contextmanager
    def explicit(self, models: ExplicitModels):
        """Inside the block, this thread's ``resolve``/``list`` also see ``models`` (the envelope's explicit
        S3 locations, :mod:`model_cache.explicit`), each checked against the allow-list again when used."""
        previous = getattr(self._job, "models", None)
        self._job.models = models
        try:
            yield self
        finally:
            self._job.models = previous

    def _explicit(self) -> ExplicitModels:
        return getattr(self._job, "models", None) or ExplicitModels()

    def list(self, kind: str, *, fresh: bool = False) -> list[ModelRef]:
        """Every model object of ``kind`` with size and last-modified, sorted by name (with the running job's
        explicit locations of that kind). Keys no name could reach are skipped. ``fresh``: not from the memo."""
        refs = list(self._list(kind, fresh=fresh))
        seen = {ref.location for ref in refs}
        for item in self._explicit().of_kind(kind):
            ref = self.resolve_uri(kind, item.uri, field=item.field)
            if ref.location not in seen:
                refs.append(ref)
                seen.add(ref.location)
        return sorted(refs, key=lambda ref: ref.name)

    def _list(self, kind: str, *, fresh: bool = False) -> list[ModelRef]:
        return self.memo.get(("list", kind), lambda: self._list_now(kind), fresh=fresh)

    def _list_now(self, kind: str) -> list[ModelRef]:
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

    def _head(self, kind: str, name: str, bucket: str, key: str) -> ModelRef | None:
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise
        return self._ref(kind, name, key, head["ContentLength"], head["LastModified"], head.get("ETag"), bucket)

    def resolve(self, kind: str, name: str, *, field: str = "name") -> ModelRef:
        """Find the object ``name`` means (HEAD per candidate, then a stem search), or raise ModelNotFound.

        Found names are remembered for ``metadata_ttl`` seconds (:mod:`model_cache.memo`)."""
        self._kind_prefix(kind)  # an unknown kind fails before anything else
        clean, _hash = names.clean_name(name, field=field)
        item = self._explicit().match(kind, clean)
        if item is not None:  # the request gave this model's location
            return self.resolve_uri(kind, item.uri, field=item.field)
        return self.memo.get(("resolve", kind, clean), lambda: self._find(kind, clean, field))

    def _find(self, kind: str, clean: str, field: str) -> ModelRef:
        base = self._kind_prefix(kind)
        tried = names.candidates(kind, clean)
        for candidate in tried:
            ref = self._head(kind, candidate, self.bucket, base + candidate)
            if ref is not None:
                return ref
        found = match_by_stem(kind, clean, self._list(kind))
        if found is not None:
            return found
        raise not_found(kind, clean, f"s3://{self.bucket}/{base}", tried, field)

    def resolve_uri(self, kind: str, uri: str, *, field: str = "models") -> ModelRef:
        """A model given by explicit location (``s3://bucket/key``): allow-list first (Forbidden, no I/O), then a HEAD."""
        names.check_kind(kind)
        bucket, key = self.allow.check(uri, field=field)
        if not names.has_extension(kind, key):
            raise InvalidParameter(f"{uri} is not a {kind} file ({', '.join(names.EXTENSIONS[kind])})", field=field)
        base = self._kind_prefix(kind)
        name = key[len(base):] if bucket == self.bucket and key.startswith(base) else key.rsplit("/", 1)[-1]
        ref = self._head(kind, name, bucket, key)
        if ref is None:
            raise ModelNotFound(f"{kind} model {uri} not found", field=field)
        return ref

    # -- the disk tier ---------------------------------------------------------------------
    def cache_path(self, bucket: str, key: str) -> Path:
        """Where ``s3://bucket/key`` lives in the disk cache."""
        return self.cache_dir / bucket / key

    def _meta_rel(self, bucket: str, key: str) -> str:
        return f".meta/{bucket}/{key}.etag"

    def _meta_path(self, bucket: str, key: str) -> Path:
        return self.cache_dir / self._meta_rel(bucket, key)

    def _adopt(self) -> None:
        """Track cached files the LRU index does not know (index lost, or cached by an older version)."""
        meta_root = self.cache_dir / ".meta"
        for dirpath, _dirs, filenames in os.walk(meta_root):
            for filename in filenames:
                if not filename.endswith(".etag"):
                    continue
                meta = Path(dirpath) / filename
                rel = meta.relative_to(meta_root).as_posix()[: -len(".etag")]
                data = self.cache_dir / rel
                if rel in self.disk or not data.is_file():
                    continue
                stat = data.stat()
                self.disk.adopt(rel, stat.st_size, max(stat.st_mtime, stat.st_atime), [rel, f".meta/{rel}.etag"])

    def _lock_for(self, location: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(location, threading.Lock())

    def job_scope(self):
        """``with store.job_scope():`` around a job: every file fetched inside stays pinned on disk until it ends."""
        return self.disk.job_scope()

    def cache_snapshot(self) -> list[dict]:
        """The disk tier's content: ``[{name, bytes, last_use, pinned}]``, most recently used first."""
        return self.disk.snapshot()

    def cache_stats(self) -> dict:
        """The disk tier's counters and sizes (see :meth:`model_cache.disk.DiskCache.stats`), and the metadata memo's."""
        return {"tier": "disk", "root": str(self.cache_dir), **self.disk.stats(), "metadata": self.memo.stats()}

    def fetch(self, ref: ModelRef) -> Path:
        """Local path of ``ref``'s bytes; downloads at most once per object version, even from N threads.

        Inside :meth:`job_scope` the file stays pinned (never evicted) until the scope ends.
        """
        bucket, key = self.allow.check(ref.location, field="location")
        rel = f"{bucket}/{key}"
        dest = self.cache_path(bucket, key)
        unpin = self.disk.pin(rel)
        try:
            with self._lock_for(ref.location):
                if self._cached(bucket, key, dest, ref) and self._sound(rel, dest, ref, remove=True):
                    files = [rel, self._meta_rel(bucket, key)]
                    size = ref.size + self._fetch_sidecars(ref.kind, bucket, key, files)  # a config may change alone
                    self.disk.hit(rel, size=size, files=files)
                    return dest
                self.disk.miss(rel)
                self._download(bucket, key, dest, ref)
            return dest
        except BaseException as exc:
            unpin()
            if isinstance(exc, ModelNotFound):
                self.memo.clear()  # it was deleted since we looked: forget what we remember
            raise
        finally:
            if not self.disk.in_scope():
                unpin()  # no job to hold it for: the file is protected only while fetch runs

    def _download(self, bucket: str, key: str, dest: Path, ref: ModelRef) -> None:
        rel = f"{bucket}/{key}"
        started = time.perf_counter()
        try:
            ref = self._transfer(bucket, key, dest, ref)
        except ObjectChanged:
            # Overwritten since resolve(): serve the current version, as a fresh resolve would.
            log.info("%s changed since it was resolved; fetching the current version", ref.location)
            self.memo.clear()  # what we remember about the store is out of date
            current = self._head(ref.kind, ref.name, bucket, key)
            if current is None:
                raise ModelNotFound(f"{ref.kind} model '{ref.name}' was deleted from {ref.location}") from None
            ref = current
            if not self._cached(bucket, key, dest, ref):
                ref = self._transfer(bucket, key, dest, ref)
        files = [rel, self._meta_rel(bucket, key)]
        size = ref.size + self._fetch_sidecars(ref.kind, bucket, key, files)
        seconds = time.perf_counter() - started
        self.disk.commit(rel, size, files, seconds=seconds, durable=False)
        self._syncer.submit(self._make_durable, rel, dest)
        log.info("fetched %s (%d bytes) into the disk tier in %.2f s", ref.location, size, seconds)

    def _make_durable(self, rel: str, dest: Path) -> None:
        """fsync a finished download (and its folder, for the rename), then tell the disk tier."""
        started = time.perf_counter()
        try:
            for path, flags in ((dest, os.O_RDONLY), (dest.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))):
                fd = os.open(path, flags)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except FileNotFoundError:
            return  # evicted or replaced meanwhile: nothing to keep
        except OSError:
            log.exception("could not sync %s; it will be fetched again after a restart", dest)
            return
        self.disk.mark_durable(rel)
        log.debug("synced %s in %.2f s", dest, time.perf_counter() - started)

    def wait_durable(self) -> None:
        """Block until every finished download so far is on disk (tests, benchmarks, shutdown)."""
        self._syncer.submit(lambda: None).result()

    def _transfer(self, bucket: str, key: str, dest: Path, ref: ModelRef) -> ModelRef:
        """Download one version into place, verify it, record its etag; a bad file is removed, never kept."""
        rel = f"{bucket}/{key}"
        with self.disk.reserve(rel, ref.size, f"{ref.kind} model '{ref.name}'"):
            # No fsync in the transfer: _make_durable does it off the request path.
            transfer.download(self.client, bucket, key, dest, ref.size, ref.etag, replace(self.transfer, fsync=False))
            self._sound(rel, dest, ref, remove=True, raise_error=True)
            # Known to the index as "not durable" before the etag record makes it a cache hit:
            # a crash from here on leaves an entry the next start-up removes, never a trusted file.
            self.disk.commit(rel, ref.size, [rel, self._meta_rel(bucket, key)], durable=False, count=False)
            self._write_meta(bucket, key, ref)
        return ref

    def _sound(self, rel: str, dest: Path, ref: ModelRef, *, remove: bool, raise_error: bool = False) -> bool:
        """Cheap structural check of a cached safetensors file; a bad copy is deleted from the disk tier."""
        if not dest.name.lower().endswith(".safetensors"):
            return True
        try:
            check_safetensors(dest, name=f"{ref.kind}/{ref.name}")
        except ModelRejected:
            if remove:
                log.warning("removing corrupt cached copy %s of %s", dest, ref.location)
                self.disk.remove(rel, [rel, f".meta/{rel}.etag"])
            if raise_error:
                raise
            return False
        return True

    def _fetch_sidecars(self, kind: str, bucket: str, key: str, files: list[str]) -> int:
        """Bring the files that travel with a checkpoint: ``<stem>.yaml`` and ``<stem>.config/**``; returns their bytes.

        They are small (configs, tokenizers) and decide how the checkpoint loads, so
        they are listed on every fetch and re-downloaded when their etag changed. They
        are evicted together with their model (``files``).
        """
        total = 0
        for side_ref in self.memo.get(("sidecars", bucket, key), lambda: self._list_sidecars(kind, bucket, key)):
            side = side_ref.name
            dest = self.cache_path(bucket, side)
            if not self._cached(bucket, side, dest, side_ref):
                transfer.download(self.client, bucket, side, dest, side_ref.size, side_ref.etag, self.transfer)
                self._write_meta(bucket, side, side_ref)
            files += [f"{bucket}/{side}", self._meta_rel(bucket, side)]
            total += side_ref.size
        return total

    def _list_sidecars(self, kind: str, bucket: str, key: str) -> list[ModelRef]:
        stem_key = key.rsplit(".", 1)[0]
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=stem_key + "."):
            for obj in page.get("Contents", []):
                side = obj["Key"]
                if side == stem_key + ".yaml" or side.startswith(stem_key + ".config/"):
                    out.append(self._ref(kind, side, side, obj["Size"], obj["LastModified"], obj.get("ETag"), bucket))
        return out

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
