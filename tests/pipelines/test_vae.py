"""sd_vae choice (Automatic / None / a name) and VAE switching on the tiny SD1 checkpoint."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from pipelines.checkpoint import load_pipeline
from pipelines.errors import ModelNotFound, ModelRejected
from pipelines.tiny import build_tiny_pipeline
from pipelines.vae import VaeManager, choose_vae, infotext_params
from tests.support.network_files import write_vae, write_vae_folder

torch.set_num_threads(1)

AVAILABLE = ["tiny-sd1.vae.pt", "other.safetensors", "sub/tiny-sd1-b.vae.safetensors", "kl-f8.ckpt", "folder-vae"]


@pytest.mark.parametrize(
    "setting, stem, available, expected",
    [
        ("Automatic", "tiny-sd1", AVAILABLE, "tiny-sd1.vae.pt"),
        (None, "tiny-sd1", AVAILABLE, "tiny-sd1.vae.pt"),
        ("", "tiny-sd1", AVAILABLE, "tiny-sd1.vae.pt"),
        ("auto", "tiny-sd1", AVAILABLE, "tiny-sd1.vae.pt"),
        ("Automatic", "tiny-sd1-b", AVAILABLE, "sub/tiny-sd1-b.vae.safetensors"),
        ("Automatic", "unmatched", AVAILABLE, None),
        ("Automatic", "kl", AVAILABLE, "kl-f8.ckpt"),  # A1111: name starts with the checkpoint stem
        ("Automatic", "m", ["m.vae.safetensors", "m.vae.ckpt", "m.vae.pt"], "m.vae.pt"),  # A1111's suffix order
        ("Automatic", "model", ["model-a.vae.pt", "model.vae.pt"], "model.vae.pt"),  # exact beats prefix
        ("Automatic", "x", ["x10.pt", "x9.pt"], "x9.pt"),  # natural sort, as A1111 lists VAEs
        ("Automatic", "folder-vae", AVAILABLE, "folder-vae"),
        ("None", "tiny-sd1", AVAILABLE, None),
        ("none", "tiny-sd1", AVAILABLE, None),
        ("other.safetensors", "tiny-sd1", AVAILABLE, "other.safetensors"),
        ("other", "tiny-sd1", AVAILABLE, "other.safetensors"),
        ("tiny-sd1-b.vae.safetensors", "tiny-sd1", AVAILABLE, "sub/tiny-sd1-b.vae.safetensors"),
        ("sub/tiny-sd1-b.vae.safetensors", "x", AVAILABLE, "sub/tiny-sd1-b.vae.safetensors"),
    ],
)
def test_choose_vae(setting, stem, available, expected):
    assert choose_vae(setting, stem, available) == expected


def test_unknown_vae_name_is_not_found():
    with pytest.raises(ModelNotFound, match="'missing.pt' not found in VAE/") as info:
        choose_vae("missing.pt", "tiny-sd1", AVAILABLE)
    assert info.value.field == "sd_vae"


def image(pipe):
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def loaded(tiny_sd1_checkpoint):
    return load_pipeline(tiny_sd1_checkpoint)


@pytest.fixture(scope="module")
def base(loaded):
    return image(loaded.pipe)


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    """One differently seeded tiny VAE in every layout, and two that do not fit."""
    root = tmp_path_factory.mktemp("VAE")
    other = build_tiny_pipeline("sd1", seed=1).vae
    wrong = AutoencoderKL(block_out_channels=(8, 16, 16, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8)
    wide_latents = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                                 latent_channels=16)
    return {
        "prefixed": write_vae(root / "other.vae.safetensors", other),
        "bare": write_vae(root / "bare.vae.pt", other, prefixed=False),
        "folder": write_vae_folder(root / "folder-vae", other),
        "wrong": write_vae(root / "wrong.safetensors", wrong),
        "latents": write_vae(root / "latents.safetensors", wide_latents),
        "latents-folder": write_vae_folder(root / "latents-folder", wide_latents),
    }


@pytest.fixture
def manager(loaded):
    mgr = VaeManager(loaded.pipe, loaded.family, config_dir=loaded.config_dir)
    yield mgr
    mgr.apply(None)


def test_named_vae_changes_the_image_and_none_restores_it_exactly(loaded, manager, vae_files, base):
    own = loaded.pipe.vae
    images = {}
    for kind in ("prefixed", "bare", "folder"):
        manager.apply(vae_files[kind], f"{kind}-sha".ljust(64, "0"))
        assert loaded.pipe.vae is not own
        images[kind] = image(loaded.pipe)
        assert np.abs(images[kind] - base).max() > 1e-3
    # the same weights in every layout decode alike
    assert np.array_equal(images["prefixed"], images["bare"]) and np.array_equal(images["bare"], images["folder"])
    manager.apply(None)
    assert loaded.pipe.vae is own
    assert np.array_equal(image(loaded.pipe), base)
    assert manager.infotext_params() == {}


def test_vaes_are_cached_by_sha256_and_bounded(loaded, vae_files):
    manager = VaeManager(loaded.pipe, loaded.family, config_dir=loaded.config_dir, max_cached=1)
    try:
        manager.apply(vae_files["prefixed"], "a" * 64)
        first = loaded.pipe.vae
        manager.apply(None)
        manager.apply(vae_files["prefixed"], "a" * 64)
        assert loaded.pipe.vae is first  # no reload
        manager.apply(vae_files["bare"], "b" * 64)
        assert manager.cached() == ["b" * 64]
    finally:
        manager.apply(None)


def test_automatic_picks_the_checkpoint_stem_match(loaded, manager, vae_files, tmp_path):
    store = tmp_path / "VAE"
    store.mkdir()
    shutil.copy(vae_files["prefixed"], store / "tiny-sd1.vae.safetensors")
    shutil.copy(vae_files["wrong"], store / "unrelated.safetensors")
    choice = choose_vae("Automatic", "tiny-sd1", sorted(p.name for p in store.iterdir()))
    assert choice == "tiny-sd1.vae.safetensors"
    manager.apply(store / choice, "c" * 64)
    automatic = image(loaded.pipe)
    manager.apply(vae_files["prefixed"], "d" * 64)
    assert np.array_equal(automatic, image(loaded.pipe))
    assert manager.infotext_params() == {"VAE hash": "d" * 10, "VAE": "other.vae.safetensors"}


@pytest.mark.parametrize("kind", ["wrong", "latents", "latents-folder"])
def test_vae_that_does_not_fit_is_rejected_naming_the_file(loaded, manager, vae_files, kind):
    own = loaded.pipe.vae
    with pytest.raises(ModelRejected, match=vae_files[kind].name):
        manager.apply(vae_files[kind], "e" * 64)
    assert loaded.pipe.vae is own


def test_non_vae_files_are_rejected(manager, tiny_sd1_checkpoint, tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelRejected, match="lora.safetensors: not a VAE"):
        manager.apply(tmp_path / "lora.safetensors", "f" * 64)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ModelRejected, match="x.bin"):
        manager.apply(tmp_path / "x.bin", "f" * 64)
    with pytest.raises(ModelNotFound, match="nothing.pt"):
        manager.apply(tmp_path / "nothing.pt", "f" * 64)


def test_dtype_follows_the_pipeline_without_a_config_dir(vae_files):
    pipe = build_tiny_pipeline("sd1", seed=0).to(dtype=torch.bfloat16)
    manager = VaeManager(pipe, "sd1")
    manager.apply(vae_files["prefixed"], "a" * 64)
    assert pipe.vae.dtype == torch.bfloat16 and pipe.vae is not manager.own
    manager.apply(vae_files["folder"], "b" * 64)
    assert pipe.vae.dtype == torch.bfloat16
    pipe.to(dtype=torch.float32)  # moves only the VAE in use; switching back carries the change over
    manager.apply(None)
    assert pipe.vae is manager.own and pipe.vae.dtype == torch.float32


def test_infotext_params():
    assert infotext_params(None, None) == {}
    assert infotext_params("kl-f8.ckpt", "0123456789abcdef" * 4) == {"VAE hash": "0123456789", "VAE": "kl-f8.ckpt"}
