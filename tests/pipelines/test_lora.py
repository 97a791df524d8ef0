"""LoRA on the tiny pipelines (pipelines/lora.py, pipelines/lora_convert.py).

Tolerance: none where the base model must come back.  peft's disabled path calls
the original layer alone and a zero scale adds exact zeros, so "no LoRA" and
"weight 0" are compared with ``==`` (measured max difference 0.0).  Files that
hold the same LoRA under other names become the same peft state dict, so they
are compared with ``==`` too; diffusers' own loader as an oracle gets 1e-6.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from pipelines.errors import InvalidParameter, ModelNotFound, ModelRejected
from pipelines.lora import LoraFile, LoraManager
from pipelines.tiny import build_tiny_pipeline
from tests.support.lora_files import (
    kohya_layer_name,
    lora_factors,
    write_diffusers_lora,
    write_kohya_lora,
    write_lycoris_lora,
)

FAMILIES = ("sd1", "sdxl")


def image(pipe) -> np.ndarray:
    gen = torch.Generator("cpu").manual_seed(7)
    out = pipe("a red cat", num_inference_steps=2, height=64, width=64, generator=gen, output_type="np")
    return out.images[0]


def spec(path, name=None, te=1.0, unet=1.0) -> LoraFile:
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return LoraFile(path, sha, name or path.stem, te, unet)


def fresh(family):
    pipe = build_tiny_pipeline(family, 0)
    return pipe, LoraManager(pipe, family)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and a busy 2-core machine makes 2 OpenMP threads stall for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(one_thread):
    """Each family's image without LoRA (fresh pipelines are identical: seeded weights)."""
    return {family: image(build_tiny_pipeline(family, 0)) for family in FAMILIES}


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    """LoRA files for the tiny sd1/sdxl pipelines, written once."""
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for family in FAMILIES:
        pipe = build_tiny_pipeline(family, 0)
        out[family, "locon"] = write_kohya_lora(root / f"{family}-locon.safetensors", pipe, family, 1, conv=True)
        out[family, "a"] = write_kohya_lora(root / f"{family}-a.safetensors", pipe, family, 2)
        out[family, "b"] = write_kohya_lora(root / f"{family}-b.safetensors", pipe, family, 3)
        out[family, "alpha=rank"] = write_kohya_lora(root / f"{family}-r.safetensors", pipe, family, 4, conv=True, alpha=4)
        out[family, "peft"] = write_diffusers_lora(root / f"{family}-peft.safetensors", pipe, family, 4, conv=True)
    pipe = build_tiny_pipeline("sd1", 0)
    out["sd1", "legacy"] = write_diffusers_lora(root / "sd1-legacy.safetensors", pipe, "sd1", 4, conv=True, style="legacy")
    out["sd1", "ldm"] = write_kohya_lora(root / "sd1-ldm.safetensors", pipe, "sd1", 1, conv=True, ldm_names=True)
    out["sd1", "pt"] = write_kohya_lora(root / "sd1-a.pt", pipe, "sd1", 2)
    return out


def test_locon_changes_the_image_as_diffusers_own_loader_does(files, base):
    for family in FAMILIES:
        pipe, loras = fresh(family)
        loras.apply([spec(files[family, "locon"])])
        ours = image(pipe)
        assert np.abs(ours - base[family]).max() > 0.05, family
        # diffusers reads diffusers-named kohya (SD1) and LDM-named kohya (SDXL) files itself.
        oracle = build_tiny_pipeline(family, 0)
        oracle.load_lora_weights(str(files[family, "locon"]), adapter_name="oracle")
        np.testing.assert_allclose(ours, image(oracle), atol=1e-6, err_msg=family)


def test_ldm_named_sd1_lora_equals_the_kohya_named_one(files, tmp_path):
    pipe, loras = fresh("sd1")
    loras.apply([spec(files["sd1", "locon"])])
    kohya = image(pipe)
    loras.apply([spec(files["sd1", "ldm"])])
    assert (image(pipe) == kohya).all()
    # Independent check of the LDM block numbering: diffusers' SGM remapper, which its
    # SD1 loader only runs when given the UNet config (attention layers only: it has
    # no notion of an up block without attention).
    ref = build_tiny_pipeline("sd1", 0)
    path = write_kohya_lora(tmp_path / "ldm-attn.safetensors", ref, "sd1", 5, ldm_names=True)
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in _keys(path))
    ref.load_lora_weights(str(path), adapter_name="oracle", unet_config=ref.unet.config)
    loras.apply([spec(path)])
    np.testing.assert_allclose(image(pipe), image(ref), atol=1e-6)


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("family,style", [("sd1", "peft"), ("sdxl", "peft"), ("sd1", "legacy")])
def test_diffusers_format_equals_kohya(files, family, style):
    pipe, loras = fresh(family)
    loras.apply([spec(files[family, "alpha=rank"])])
    kohya = image(pipe)
    loras.apply([spec(files[family, style])])
    assert (image(pipe) == kohya).all()


def test_diffusers_metadata_alpha_is_honoured(files, tmp_path):
    pipe, loras = fresh("sd1")
    config = {f"{c}.{k}": v for c in ("unet", "text_encoder") for k, v in (("r", 4), ("lora_alpha", 2))}
    meta = {"lora_adapter_metadata": json.dumps(config)}
    path = write_diffusers_lora(tmp_path / "meta.safetensors", pipe, "sd1", 2, metadata=meta)
    loras.apply([spec(files["sd1", "a"])])  # kohya, same factors, alpha 2
    expected = image(pipe)
    loras.apply([spec(path)])
    assert (image(pipe) == expected).all()


def test_cached_adapters_do_not_leak_into_other_requests(files, tmp_path):
    pipe, loras = fresh("sd1")
    te_only = write_kohya_lora(tmp_path / "te.safetensors", pipe, "sd1", 6, unet=False)
    loras.apply([spec(files["sd1", "locon"])])  # stays cached, its UNet layers wrapped
    loras.apply([spec(te_only)])
    clean, clean_loras = fresh("sd1")
    clean_loras.apply([spec(te_only)])
    assert (image(pipe) == image(clean)).all()


def test_pickled_lora_equals_safetensors(files):
    pipe, loras = fresh("sd1")
    loras.apply([spec(files["sd1", "a"])])
    expected = image(pipe)
    loras.apply([spec(files["sd1", "pt"])])
    assert (image(pipe) == expected).all()


def test_weight_zero_and_no_lora_give_the_base_image(files, base):
    pipe, loras = fresh("sd1")
    loras.apply([spec(files["sd1", "a"])])
    with_lora = image(pipe)
    assert np.abs(with_lora - base["sd1"]).max() > 0.05
    loras.apply([])
    assert (image(pipe) == base["sd1"]).all()
    loras.apply([spec(files["sd1", "a"], te=0.0, unet=0.0)])
    assert (image(pipe) == base["sd1"]).all()
    loras.apply([spec(files["sd1", "a"])])  # re-enabled after the LoRA-free request
    assert (image(pipe) == with_lora).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoder_and_unet_weights_act_separately(files, base, family):
    pipe, loras = fresh(family)
    path = files[family, "a"]
    results = {}
    for te, unet in ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0)):
        loras.apply([spec(path, te=te, unet=unet)])
        results[te, unet] = image(pipe)
    both, te_only, unet_only = results[1.0, 1.0], results[1.0, 0.0], results[0.0, 1.0]
    for name, img in (("te only", te_only), ("unet only", unet_only)):
        assert np.abs(img - base[family]).max() > 0.01, name
        assert np.abs(img - both).max() > 0.01, name
    assert np.abs(te_only - unet_only).max() > 0.01


def test_layers_compute_a1111s_formula(tmp_path):
    """W' = W + multiplier · alpha/rank · up·down, for Linear, 3×3 conv and text-encoder layers."""
    pipe, loras = fresh("sdxl")
    path = write_kohya_lora(tmp_path / "x.safetensors", pipe, "sdxl", 9, conv=True, alpha=3.0, rank=4)
    factors = lora_factors(pipe, "sdxl", 9, conv=True, rank=4)
    te_w, unet_w = 0.7, -0.5
    loras.apply([spec(path, te=te_w, unet=unet_w)])
    gen = torch.Generator().manual_seed(0)
    for component, layer, weight in (
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", unet_w),
        ("unet", "up_blocks.0.resnets.1.conv1", unet_w),
        ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1", te_w),
    ):
        wrapped = getattr(pipe, component).get_submodule(layer)
        base_layer = wrapped.get_base_layer()
        down, up = factors[component, layer]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(base_layer.weight.shape) * (3.0 / 4) * weight
        if isinstance(base_layer, torch.nn.Conv2d):
            x = torch.randn(1, base_layer.in_channels, 8, 8, generator=gen)
            expected = torch.nn.functional.conv2d(x, base_layer.weight + delta, base_layer.bias, padding=base_layer.padding)
        else:
            x = torch.randn(3, base_layer.in_features, generator=gen)
            expected = torch.nn.functional.linear(x, base_layer.weight + delta, base_layer.bias)
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x), expected, atol=1e-5, rtol=1e-5, msg=layer)


def test_two_loras_combine(files):
    pipe, loras = fresh("sd1")
    a, b = spec(files["sd1", "a"]), spec(files["sd1", "b"])
    loras.apply([a])
    only_a = image(pipe)
    loras.apply([b])
    only_b = image(pipe)
    loras.apply([a, b])
    both = image(pipe)
    assert np.abs(both - only_a).max() > 0.01 and np.abs(both - only_b).max() > 0.01
    assert sorted(pipe.get_list_adapters()["unet"]) == sorted(LoraManager.adapter_name(s.sha256) for s in (a, b))


def test_same_file_twice_loads_once_and_adds_weights(files):
    pipe, loras = fresh("sd1")
    path = files["sd1", "a"]
    loras.apply([spec(path, te=1.0, unet=0.5)])
    expected = image(pipe)
    loras.apply([spec(path, "first", te=0.25, unet=0.25), spec(path, "second", te=0.75, unet=0.25)])
    assert (image(pipe) == expected).all()
    assert len(loras.loaded()) == 1 and len(pipe.get_list_adapters()["unet"]) == 1


@pytest.mark.parametrize("lora_family,checkpoint", [("sdxl", "sd1"), ("sd1", "sdxl")])
def test_lora_for_another_family_is_a_clear_error(files, base, lora_family, checkpoint):
    pipe, loras = fresh(checkpoint)
    names = {"sd1": "SD1", "sdxl": "SDXL"}
    path = files[lora_family, "a"]
    with pytest.raises(InvalidParameter) as err:
        loras.apply([spec(path, "styled")])
    message = str(err.value)
    assert path.name in message and "'styled'" in message
    assert f"is an {names[lora_family]} LoRA" in message and f"checkpoint is {names[checkpoint]}" in message
    assert loras.loaded() == [] and not any(pipe.get_list_adapters().values())
    assert (image(pipe) == base[checkpoint]).all()


def test_shape_mismatch_is_the_same_clear_error(tmp_path):
    _, loras = fresh("sd1")
    other = build_tiny_pipeline("sd1", 0)
    # Same layer names, other widths: a LoRA for a bigger model of the same layout.
    other.text_encoder.encoder.layers[0].self_attn.q_proj = torch.nn.Linear(48, 48)
    path = write_kohya_lora(tmp_path / "wide.safetensors", other, "sd1", 1, unet=False)
    with pytest.raises(InvalidParameter, match=r"wide\.safetensors.*different model than this SD1 checkpoint.*other shapes"):
        loras.apply([spec(path)])


@pytest.mark.parametrize("kind,fmt", [("loha", "LoHa"), ("lokr", "LoKr")])
def test_lycoris_formats_are_refused_by_name(tmp_path, kind, fmt):
    pipe, loras = fresh("sd1")
    path = write_lycoris_lora(tmp_path / f"{kind}.safetensors", pipe, "sd1", 1, kind=kind)
    with pytest.raises(ModelRejected, match=rf"{kind}\.safetensors.*{fmt} is not supported"):
        loras.apply([spec(path)])


def test_corrupt_missing_file_and_bad_weight_are_rejected(tmp_path, files):
    _, loras = fresh("sd1")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelRejected, match="broken.safetensors"):
        loras.apply([spec(bad)])
    gone = LoraFile(tmp_path / "gone.safetensors", "0" * 64, "gone")
    with pytest.raises(ModelNotFound, match="gone.safetensors"):
        loras.apply([gone])
    with pytest.raises(InvalidParameter, match="finite"):
        loras.apply([spec(files["sd1", "a"], unet=float("nan"))])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_adapter_cache_stays_bounded(tmp_path, capsys):
    pipe = build_tiny_pipeline("sd1", 0)
    loras = LoraManager(pipe, "sd1", max_adapters=3)
    paths = [write_kohya_lora(tmp_path / f"l{i}.safetensors", pipe, "sd1", 10 + i, conv=True) for i in range(6)]
    specs = [spec(p) for p in paths]
    sets = [[specs[i % 6], specs[(i + 2) % 6]] if i % 3 else [specs[i % 6]] for i in range(20)]
    first_seen = {}
    rss = []
    for i, request in enumerate(sets):
        loras.apply(request)
        key = tuple(s.sha256 for s in request)
        img = image(pipe)
        if key in first_seen:  # reloaded after eviction: the same image
            assert (img == first_seen[key]).all()
        first_seen.setdefault(key, img)
        assert len(loras.loaded()) <= 3 and len(pipe.get_list_adapters()["unet"]) <= 3
        rss.append(_rss_bytes())
    growth = rss[-1] - rss[5]
    with capsys.disabled():
        print(f"\nLoRA cache: 20 requests over 6 files ({paths[0].stat().st_size // 1024} KiB each), max 3 adapters; RSS after #6 {rss[5] / 2**20:.1f} MiB, "
              f"after #20 {rss[-1] / 2**20:.1f} MiB, growth {growth / 2**20:+.2f} MiB")
    assert growth < 8 * 2**20


def test_infotext_lora_hashes_as_a1111(tmp_path, files):
    pipe, loras = fresh("sd1")
    st = files["sd1", "a"]
    data = st.read_bytes()
    header = int.from_bytes(data[:8], "little")
    addnet = hashlib.sha256(data[8 + header :]).hexdigest()[:12]  # the tensor bytes after the header
    pt = files["sd1", "pt"]
    whole = hashlib.sha256(pt.read_bytes()).hexdigest()[:12]
    signed = write_kohya_lora(tmp_path / "signed.safetensors", pipe, "sd1", 2, metadata={"sshs_model_hash": "ab" * 32})
    specs = [spec(st, "my:lora,v2"), spec(pt, "pickled"), spec(st, "my:lora,v2", 0.5), spec(signed, "signed")]
    assert loras.infotext_value(specs) == f"mylorav2: {addnet}, pickled: {whole}, signed: {'ab' * 6}"
    assert addnet != hashlib.sha256(data).hexdigest()[:12]


def test_library_chatter_stays_out_of_stderr(files, capfd):
    _, loras = fresh("sdxl")
    loras.apply([spec(files["sdxl", "a"])])
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "Loading weights" not in err


def test_works_on_pipelines_loaded_from_checkpoints(tiny_sd1_checkpoint, tiny_sdxl_checkpoint, files):
    """Layer names of from_single_file pipelines (the server's) match the tiny builder's."""
    from pipelines.checkpoint import load_pipeline

    for family, path in (("sd1", tiny_sd1_checkpoint), ("sdxl", tiny_sdxl_checkpoint)):
        loaded = load_pipeline(path)
        base_image = image(loaded.pipe)
        loras = LoraManager(loaded.pipe, loaded.family)
        loras.apply([spec(files[family, "locon"])])
        assert np.abs(image(loaded.pipe) - base_image).max() > 0.05
        loras.apply([])
        assert (image(loaded.pipe) == base_image).all()


def test_writer_uses_the_trainers_names():
    """A guard on the helper the other tests rely on."""
    pipe = build_tiny_pipeline("sdxl", 0)
    name = kohya_layer_name(pipe, "sdxl", "unet", "down_blocks.1.attentions.0.proj_in", ldm_names=True)
    assert name == "lora_unet_input_blocks_3_1_proj_in"  # 0 conv_in, 1 resnet, 2 downsampler, 3 resnet+attention
    te = kohya_layer_name(pipe, "sdxl", "text_encoder", "encoder.layers.0.self_attn.q_proj", ldm_names=True)
    assert te == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
