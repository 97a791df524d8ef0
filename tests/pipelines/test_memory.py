"""pipelines.memory / pipelines.residency: weighing, sharing identical components, memory really returned."""

from __future__ import annotations

import gc

import pytest
import torch

from pipelines import memory
from pipelines.checkpoint import load_pipeline
from pipelines.residency import RAM, PipelineCache, attached_modules

MB = 1 << 20


def _image(pipe, seed: int = 3):
    return pipe(prompt="a photo of a cat", num_inference_steps=2, width=64, height=64,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]


def test_module_bytes_counts_each_storage_once():
    lin = torch.nn.Linear(100, 100)
    both = torch.nn.Sequential(lin, lin)  # the same weights twice
    assert memory.module_bytes(lin) == (100 * 100 + 100) * 4
    assert memory.module_bytes(both) == memory.module_bytes(lin)
    small = torch.nn.Linear(10, 1)
    parts = memory.part_sizes([lin, both, lin, small])  # a module listed twice is one part
    assert list(parts) == [id(lin), id(both), id(small)] and parts[id(small)] == 44


def test_identical_vae_is_shared_and_images_do_not_change(tiny_model_store):
    folder = tiny_model_store / "Stable-diffusion"
    cache = PipelineCache(device="cpu", ram_budget=1 << 30, vram_budget=None, modules_of=lambda lc: memory.pipeline_modules(lc.pipe))
    first = load_pipeline(folder / "tiny-sd1.safetensors")
    assert cache.share(first.pipe) == []
    again = load_pipeline(folder / "tiny-sd1.safetensors")  # same VAE baked in (a copy of the file would do the same)
    before = _image(again.pipe)
    assert cache.share(again.pipe) == ["vae"]
    assert again.pipe.vae is first.pipe.vae and again.pipe.unet is not first.pipe.unet
    assert (_image(again.pipe) == before).all()
    other = load_pipeline(folder / "tiny-sd1-b.safetensors")  # other seed: other VAE
    assert cache.share(other.pipe) == [] and other.pipe.vae is not first.pipe.vae
    assert cache.shared.shared_bytes == memory.module_bytes(first.pipe.vae)


def test_near_identical_vae_is_not_shared(tiny_model_store):
    path = tiny_model_store / "Stable-diffusion" / "tiny-sd1.safetensors"
    shared = memory.SharedComponents()
    first, second = load_pipeline(path), load_pipeline(path)
    weight = second.pipe.vae.decoder.conv_out.weight
    with torch.no_grad():
        weight.view(-1)[1] += 1e-3  # not a sampled element: same fingerprint, different content
    assert memory.fingerprint(first.pipe.vae) == memory.fingerprint(second.pipe.vae)
    shared.share(first.pipe)
    assert shared.share(second.pipe) == [] and second.pipe.vae is not first.pipe.vae


def test_attached_modules_cover_vae_and_hypernetwork_caches():
    from types import SimpleNamespace as NS

    net = NS(layers={320: (torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))})
    extras = NS(vae=NS(own=torch.nn.Linear(1, 1), _cache={"sha": torch.nn.Linear(2, 2)}), hypernets=NS(_cache={"sha": net}))

    mods = attached_modules(extras)
    assert [m.in_features for m in mods] == [1, 2, 3, 3]
    assert attached_modules(None) == []


def test_estimate_is_close_to_the_loaded_size(tiny_sd1_checkpoint):
    loaded = load_pipeline(tiny_sd1_checkpoint)
    actual = sum(memory.module_bytes(m) for m in memory.pipeline_modules(loaded.pipe))
    estimate = memory.estimate_bytes(tiny_sd1_checkpoint, torch.float32)
    assert 0.9 * actual <= estimate <= 1.1 * actual


def test_malloc_trim_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    memory.malloc_trim()  # returns whether memory was released: either is fine, it must not raise
    assert memory._libc() is not None


@pytest.fixture(scope="module")
def medium_checkpoints(tmp_path_factory):
    """Two ~60 MB (fp32 in memory) SD1-layout checkpoints: big enough for RSS to show a leak."""
    from bench.memory import write_sized_sd1

    folder = tmp_path_factory.mktemp("medium")
    return [write_sized_sd1(folder, f"medium-{i}", width=32, text_width=128, seed=i) for i in range(2)]


def test_rss_returns_after_eviction(medium_checkpoints):
    """Load, evict, load … : RSS after each eviction stays flat, and clearing the cache gives the models back."""
    torch.set_grad_enabled(False)
    try:
        loaded = load_pipeline(medium_checkpoints[0])
        size = sum(memory.module_bytes(m) for m in memory.pipeline_modules(loaded.pipe))
        assert size > 40 * MB
        del loaded
        memory.release_memory()
        cache = PipelineCache(device="cpu", ram_budget=int(size * 1.5), vram_budget=None,
                              modules_of=lambda lc: memory.pipeline_modules(lc.pipe))
        after = []
        for i in range(6):
            path = medium_checkpoints[i % 2]
            lc, event = cache.acquire(f"{path.stem}", lambda p=path: load_pipeline(p), estimate=size, label=path.stem)
            assert event.source == "load" and (i == 0 or event.evicted)
            del lc
            cache.release(path.stem)
            after.append(memory.rss_bytes())
        assert cache.residency.keys(RAM) == [medium_checkpoints[1].stem]
        drift = max(after[2:]) - min(after[2:])
        assert drift < 0.25 * size, [a >> 20 for a in after]
        holding = memory.rss_bytes()
        cache.clear()
        gc.collect()
        returned = holding - memory.rss_bytes()
        assert returned > 0.7 * size, (returned >> 20, size >> 20)
    finally:
        torch.set_grad_enabled(True)


def test_device_tiers_move_whole_entries_and_keep_shared_modules_on_the_device(monkeypatch):
    """The CUDA path without a GPU: moves are recorded instead of done (the logic under test is which modules go where)."""
    from types import SimpleNamespace as NS

    moves = []
    monkeypatch.setattr(memory, "move_modules", lambda mods, device, keep=(): moves.append(
        (device, sorted(m.tag for m in mods), sorted(m.tag for m in keep))))

    def entry(tag: str, vae):
        unet = torch.nn.Linear(64, 64)
        unet.tag = f"unet-{tag}"
        return NS(name=tag, modules=[unet, vae])

    vae = torch.nn.Linear(8, 8)
    vae.tag = "vae"
    a, b, c = entry("a", vae), entry("b", vae), entry("c", torch.nn.Linear(8, 8))
    c.modules[1].tag = "vae-c"
    unet_bytes = memory.module_bytes(a.modules[0])
    cache = PipelineCache(device="cuda:0", ram_budget=10 * unet_bytes, vram_budget=int(2.5 * unet_bytes),
                          modules_of=lambda e: e.modules)
    for e in (a, b):
        cache.acquire(e.name, lambda e=e: e, label=e.name)
        cache.release(e.name)
    assert cache.residency.keys("vram") == ["a", "b"] and moves == []
    cache.acquire("c", lambda: c, label="c")  # room for c: a goes to RAM, but its VAE stays for b
    assert moves == [("cpu", ["unet-a", "vae"], ["unet-b", "unet-c", "vae", "vae-c"])]
    assert cache.residency.keys("vram") == ["b", "c"] and cache.residency.keys("ram") == ["a"]
    cache.release("c")
    moves.clear()
    _, event = cache.acquire("a", lambda: pytest.fail("a is in RAM: no load"), label="a")
    # b (LRU on the device) made room, then a moved up whole
    assert moves == [("cpu", ["unet-b", "vae"], ["unet-a", "unet-c", "vae", "vae-c"]), ("cuda:0", ["unet-a", "vae"], [])]
    assert event.source == "ram" and cache.residency.keys("vram") == ["c", "a"] and cache.residency.keys("ram") == ["b"]
