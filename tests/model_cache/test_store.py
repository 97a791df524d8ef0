"""Model store: the local folder and S3 (real SeaweedFS) behind the same tests."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from model_cache.store import LocalStore, ModelStore, S3Store, open_store
from model_cache.transfer import TransferConfig, TransferFailed
from pipelines.errors import InvalidParameter, ModelNotFound
from tests.model_cache.helpers import safetensors_bytes as st


class CountingClient:
    """Wraps a boto3 client: counts every call, slows or breaks ``get_object`` on demand."""

    def __init__(self, client, *, get_delay: float = 0.0, fail_after_fraction: float | None = None):
        self._client = client
        self.calls: list[str] = []
        self.get_delay = get_delay
        self.fail_after_fraction = fail_after_fraction
        self._lock = threading.Lock()

    def gets(self) -> int:
        return self.calls.count("get_object")

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with self._lock:
                self.calls.append(name)
            if name == "get_object":
                time.sleep(self.get_delay)  # widen the race window for the single-flight test
                response = attr(*args, **kwargs)
                if self.fail_after_fraction is not None:
                    response["Body"] = _BreakingBody(response["Body"], response["ContentLength"], self.fail_after_fraction)
                return response
            return attr(*args, **kwargs)

        return call


class _BreakingBody:
    """A response body that delivers part of the bytes, then the connection "drops"."""

    def __init__(self, body, length, fraction):
        self._body, self._limit, self._sent = body, int(length * fraction), 0

    def readinto(self, buffer):
        want = min(len(buffer), 4096)
        if self._sent + want > self._limit:
            raise ConnectionResetError("connection dropped midway (test)")
        count = self._body.readinto(memoryview(buffer)[:want])
        self._sent += count
        return count

    def close(self):
        self._body.close()


class LocalBackend:
    name = "local"

    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "models"
        self.root.mkdir()
        self.where = str(self.root)

    def put(self, kind: str, name: str, data: bytes) -> None:
        path = self.root / kind / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def store(self, **_wrap) -> ModelStore:
        return LocalStore(self.root)


class S3Backend:
    name = "s3"

    def __init__(self, client, bucket: str, tmp_path: Path):
        self.client, self.bucket = client, bucket
        self.cache_dir = tmp_path / "cache"
        self.where = f"s3://{bucket}/models/"
        self.wrapped: CountingClient | None = None

    def put(self, kind: str, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"models/{kind}/{name}", Body=data)

    def store(self, **wrap) -> S3Store:
        self.wrapped = CountingClient(self.client, **wrap)
        return S3Store(self.where, self.wrapped, self.cache_dir, transfer=TransferConfig(backoff_base=0.01, retries=2))


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    if request.param == "local":
        return LocalBackend(tmp_path)
    return S3Backend(request.getfixturevalue("s3_client"), request.getfixturevalue("s3_bucket"), tmp_path)


@pytest.fixture
def s3_backend(s3_client, s3_bucket, tmp_path):
    return S3Backend(s3_client, s3_bucket, tmp_path)


def test_list_per_kind_with_size_and_mtime(backend):
    started = time.time()
    backend.put("Stable-diffusion", "a.safetensors", b"a" * 10)
    backend.put("Stable-diffusion", "sub/b.ckpt", b"b" * 20)
    backend.put("Stable-diffusion", "notes.txt", b"ignored")
    backend.put("Stable-diffusion", ".c.safetensors.abc.part", b"download in progress")
    backend.put("Lora", "styles/l.safetensors", b"l" * 5)
    store = backend.store()
    assert isinstance(store, ModelStore)
    sd = store.list("Stable-diffusion")
    assert [(r.name, r.size, r.kind) for r in sd] == [("a.safetensors", 10, "Stable-diffusion"), ("sub/b.ckpt", 20, "Stable-diffusion")]
    for ref in sd:
        assert started - 5 <= ref.modified <= time.time() + 5  # S3 times have 1 s resolution
    assert [r.name for r in store.list("Lora")] == ["styles/l.safetensors"]
    assert store.list("VAE") == []
    with pytest.raises(InvalidParameter):
        store.list("Checkpoints")
    assert backend.where.rstrip("/") in store.description


def test_resolve_with_without_extension_and_hash(backend):
    backend.put("Stable-diffusion", "v1-5-pruned-emaonly.safetensors", b"x" * 7)
    backend.put("Stable-diffusion", "sub/dir/other.ckpt", b"y" * 3)
    backend.put("Lora", "styles/detail.safetensors", b"z")
    backend.put("embeddings", "bad-hands.pt", b"e")
    store = backend.store()
    for name in ("v1-5-pruned-emaonly", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly.safetensors [6ce0161689]"):
        ref = store.resolve("Stable-diffusion", name)
        assert (ref.name, ref.size) == ("v1-5-pruned-emaonly.safetensors", 7)
    assert store.resolve("Stable-diffusion", "sub/dir/other").name == "sub/dir/other.ckpt"
    # A1111 finds a bare name in any sub-folder (how <lora:detail:1> works).
    assert store.resolve("Lora", "detail").name == "styles/detail.safetensors"
    assert store.resolve("Stable-diffusion", "other.ckpt [0123456789]").name == "sub/dir/other.ckpt"
    assert store.resolve("embeddings", "bad-hands").name == "bad-hands.pt"
    location = store.resolve("Stable-diffusion", "v1-5-pruned-emaonly").location
    assert location.endswith("Stable-diffusion/v1-5-pruned-emaonly.safetensors")


def test_not_found_names_name_and_location(backend):
    backend.put("Stable-diffusion", "present.safetensors", b"p")
    store = backend.store()
    with pytest.raises(ModelNotFound) as info:
        store.resolve("Stable-diffusion", "missing [0123456789]", field="payload.override_settings.sd_model_checkpoint")
    message = info.value.message
    assert "'missing'" in message
    assert backend.where.rstrip("/") + "/Stable-diffusion/" in message
    assert "missing.safetensors, missing.ckpt" in message
    assert info.value.field == "payload.override_settings.sd_model_checkpoint"


@pytest.mark.parametrize("bad", ["../Lora/x", "/etc/passwd", "a\\b", "%2e%2e%2fx", "s3://other/x", "x\x00"])
def test_bad_names_rejected_before_io(backend, bad):
    store = backend.store()
    with pytest.raises(InvalidParameter):
        store.resolve("Stable-diffusion", bad)
    if backend.name == "s3":
        assert backend.wrapped.calls == []


def test_fetch_gives_the_bytes(backend):
    backend.put("VAE", "sub/vae.safetensors", st(b"vae-bytes"))
    store = backend.store()
    path = store.fetch(store.resolve("VAE", "sub/vae"))
    assert path.read_bytes() == st(b"vae-bytes")
    assert path.is_absolute()


def test_s3_fetch_caches_and_refetches_after_change(s3_backend):
    s3_backend.put("Stable-diffusion", "m.safetensors", st(b"one" * 100))
    store = s3_backend.store()
    path = store.fetch(store.resolve("Stable-diffusion", "m"))
    assert path == s3_backend.cache_dir / s3_backend.bucket / "models/Stable-diffusion/m.safetensors"
    assert path.read_bytes() == st(b"one" * 100)
    assert store.fetch(store.resolve("Stable-diffusion", "m")) == path
    assert s3_backend.wrapped.gets() == 1  # second fetch: a HEAD, no GET
    s3_backend.put("Stable-diffusion", "m.safetensors", st(b"two" * 100))  # same size, new etag
    ref = store.resolve("Stable-diffusion", "m")
    assert store.fetch(ref).read_bytes() == st(b"two" * 100)
    assert s3_backend.wrapped.gets() == 2


def test_s3_fetch_of_a_stale_ref_gets_the_current_object(s3_backend):
    s3_backend.put("Lora", "l.safetensors", st(b"old"))
    store = s3_backend.store()
    ref = store.resolve("Lora", "l")
    s3_backend.put("Lora", "l.safetensors", st(b"newer"))  # overwritten between resolve and fetch
    assert store.fetch(ref).read_bytes() == st(b"newer")
    assert store.fetch(store.resolve("Lora", "l")).read_bytes() == st(b"newer")


def test_s3_concurrent_fetches_download_once(s3_backend):
    s3_backend.put("Stable-diffusion", "big.safetensors", st(os.urandom(256 * 1024)))
    store = s3_backend.store(get_delay=0.3)
    ref = store.resolve("Stable-diffusion", "big")
    barrier = threading.Barrier(8)
    paths, errors = [], []

    def worker():
        barrier.wait()
        try:
            paths.append(store.fetch(ref))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(paths)) == 1 and len(paths) == 8
    assert s3_backend.wrapped.gets() == 1


def test_s3_download_failing_midway_leaves_nothing(s3_backend):
    data = st(os.urandom(200 * 1024))
    s3_backend.put("Stable-diffusion", "broken.safetensors", data)
    store = s3_backend.store(fail_after_fraction=0.5)
    ref = store.resolve("Stable-diffusion", "broken")
    with pytest.raises(TransferFailed, match="broken.safetensors"):
        store.fetch(ref)
    assert s3_backend.wrapped.gets() == 3  # the first attempt and the two retries the config allows
    folder = s3_backend.cache_dir / s3_backend.bucket / "models/Stable-diffusion"
    assert list(folder.iterdir()) == []  # no final file, no temp file
    # The next attempt, with a healthy connection, completes.
    healthy = s3_backend.store()
    assert healthy.fetch(ref).read_bytes() == data


def test_local_symlinked_files_and_folders_are_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "loras").mkdir(parents=True)
    (elsewhere / "loras" / "far.safetensors").write_bytes(st(b"far"))
    (elsewhere / "single.ckpt").write_bytes(b"single")
    root = tmp_path / "models"
    (root / "Lora").mkdir(parents=True)
    (root / "Stable-diffusion").mkdir()
    os.symlink(elsewhere / "loras", root / "Lora" / "linked")
    os.symlink(elsewhere / "single.ckpt", root / "Stable-diffusion" / "single.ckpt")
    os.symlink(root / "Lora", root / "Lora" / "loop")  # a cycle must not hang list()
    os.symlink(tmp_path / "nowhere.ckpt", root / "Stable-diffusion" / "dangling.ckpt")
    store = LocalStore(root)
    assert [r.name for r in store.list("Lora")] == ["linked/far.safetensors"]
    assert store.fetch(store.resolve("Lora", "far")).read_bytes() == st(b"far")
    assert [r.name for r in store.list("Stable-diffusion")] == ["single.ckpt"]
    assert store.resolve("Stable-diffusion", "single").size == 6
    with pytest.raises(InvalidParameter):
        store.resolve("Lora", "../../elsewhere/single")


def test_open_store_dispatch(tmp_path, s3_client, s3_bucket):
    made = []

    def factory():
        made.append(1)
        return s3_client

    local = open_store(str(tmp_path), cache_dir=tmp_path / "c", s3_client_factory=factory)
    assert isinstance(local, LocalStore) and made == []
    assert isinstance(open_store(f"file://{tmp_path}", cache_dir=tmp_path, s3_client_factory=factory), LocalStore)
    remote = open_store(f"s3://{s3_bucket}/p", cache_dir=tmp_path / "c", s3_client_factory=factory)
    assert isinstance(remote, S3Store) and remote.description == f"s3://{s3_bucket}/p/" and made == [1]
    for bad in ("gs://bucket/x", "s3://BAD_bucket/", "s3://"):
        with pytest.raises(InvalidParameter):
            open_store(bad, cache_dir=tmp_path, s3_client_factory=factory)


def test_no_torch_import():
    code = "import sys, model_cache.store, model_cache.hashes, model_cache.s3, serve.outputs; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
