"""A1111 hypernetworks on the tiny SD1 model: file layout, the k/v formula, strength, chaining, restore, safety."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from pipelines.errors import ModelRejected
from pipelines.hypernetwork import (
    HypernetMLP,
    HypernetSpec,
    HypernetworkAttnProcessor,
    HypernetworkManager,
    infotext_params,
    load_hypernetwork,
    records,
)
from pipelines.tiny import build_tiny_pipeline
from tests.support.network_files import write_hypernetwork

torch.set_num_threads(1)

# Tiny SD1: cross-attention context 32 wide; transformer hidden widths 32 (outer blocks) and 64 (mid block).
TINY_SIZES = (32, 64)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("sd1", seed=0)


@pytest.fixture
def manager(pipe):
    mgr = HypernetworkManager(pipe)
    yield mgr
    mgr.clear()


@pytest.fixture(scope="module")
def hn_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hypernetworks")
    return {
        "a": write_hypernetwork(root / "a.pt", TINY_SIZES, seed=1),
        "b": write_hypernetwork(root / "b.pt", TINY_SIZES, seed=2, activation_func="mish", is_layer_norm=True),
        "mid": write_hypernetwork(root / "mid.pt", (64,), seed=3),
        "sd15": write_hypernetwork(root / "sd15.pt", (768, 320, 640, 1280), seed=4, std=0.01),
    }


def spec(files, key, strength=1.0):
    return HypernetSpec(files[key], f"sha-{key}", key, strength)


def image(pipe):
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def base(pipe):
    return image(pipe)


def _keys(mlp):
    return sorted({k.rsplit(".", 1)[0] for k in mlp.state_dict()})


@pytest.mark.parametrize(
    "structure, activation, layer_norm, activate_output, dropouts, expected",
    [
        ([1, 2, 1], "relu", False, False, [0, 0, 0], ["linear.0", "linear.2"]),
        ([1, 2, 1], "linear", False, True, [0, 0, 0], ["linear.0", "linear.1"]),
        ([1, 2, 1], "relu", True, False, [0, 0, 0], ["linear.0", "linear.2", "linear.3", "linear.4"]),
        ([1, 2, 1], "relu", True, True, [0, 0, 0], ["linear.0", "linear.2", "linear.3", "linear.5"]),
        # use_dropout, last_layer_dropout False → [0, 0.3, 0, 0]: Linear ReLU Dropout Linear ReLU Linear
        ([1, 2, 2, 1], "relu", False, False, [0, 0.3, 0, 0], ["linear.0", "linear.3", "linear.5"]),
    ],
)
def test_mlp_layout_matches_a1111_state_dict_keys(structure, activation, layer_norm, activate_output, dropouts, expected):
    mlp = HypernetMLP(8, structure, activation, layer_norm, activate_output, dropouts)
    assert _keys(mlp) == expected


def test_activation_names_follow_a1111():
    def acts(name):
        return [type(m).__name__ for m in HypernetMLP(4, [1, 2, 1], name, False, True, [0, 0, 0]).linear]

    assert acts("swish") == ["Linear", "Hardswish", "Linear", "Hardswish"]  # A1111's "swish" is Hardswish
    assert acts("mish") == ["Linear", "Mish", "Linear", "Mish"]
    assert acts("gelu")[1] == "GELU"
    with pytest.raises(ValueError, match="unsupported activation"):
        HypernetMLP(4, [1, 2, 1], "nonsense", False, True, [0, 0, 0])


def test_loads_every_a1111_variant(tmp_path):
    cases = [
        {"layer_structure": (1, 2, 1), "activation_func": "relu"},
        {"layer_structure": (1, 1.5, 1), "activation_func": "elu", "is_layer_norm": True, "activate_output": True},
        {"layer_structure": (1, 2, 2, 1), "activation_func": "leakyrelu", "use_dropout": True},
        {"layer_structure": (1, 2, 2, 1), "activation_func": "tanh", "use_dropout": True, "last_layer_dropout": True},
        {"layer_structure": (1, 1), "activation_func": "linear", "old_key_names": True},
    ]
    for i, options in enumerate(cases):
        net = load_hypernetwork(write_hypernetwork(tmp_path / f"{i}.pt", (16, 24), **options), "abc")
        assert net.sizes == [16, 24] and net.sha256 == "abc"
        k, v = net.layers[16]
        assert k(torch.zeros(1, 3, 16)).shape == (1, 3, 16) and v is not k


def test_processor_applies_the_a1111_formula():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    k_mlp = HypernetMLP(8, [1, 2, 1], "relu", False, False, [0, 0, 0]).eval()
    v_mlp = HypernetMLP(8, [1, 2, 1], "relu", False, False, [0, 0, 0]).eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    processor = HypernetworkAttnProcessor(AttnProcessor2_0(), [(k_mlp, 0.7)], [(v_mlp, 0.7)])
    with torch.no_grad():
        got = processor(attn, x, encoder_hidden_states=ctx)
        q = attn.to_q(x).view(2, -1, 2, 8).transpose(1, 2)
        k = attn.to_k(ctx + k_mlp(ctx) * 0.7).view(2, -1, 2, 8).transpose(1, 2)
        v = attn.to_v(ctx + v_mlp(ctx) * 0.7).view(2, -1, 2, 8).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, -1, 16)
        want = attn.to_out[0](out)
    torch.testing.assert_close(got, want)


def test_changes_image_and_zero_or_removed_restores_base_exactly(pipe, manager, hn_files, base):
    originals = pipe.unet.attn_processors
    assert manager.apply([spec(hn_files, "a")]) == []
    changed = image(pipe)
    assert np.abs(changed - base).max() > 1e-3
    wrapped = pipe.unet.attn_processors
    assert all(isinstance(p, HypernetworkAttnProcessor) for p in wrapped.values())
    assert all(wrapped[n].inner is originals[n] for n in originals)  # wraps, does not replace

    manager.apply([spec(hn_files, "a", 0.0)])
    assert np.array_equal(image(pipe), base)
    manager.apply([spec(hn_files, "a")])
    manager.apply([])
    assert np.array_equal(image(pipe), base)
    assert all(pipe.unet.attn_processors[n] is originals[n] for n in originals)


def test_strength_scales_the_change(pipe, manager, hn_files, base):
    distance = {}
    for strength in (0.5, 1.0):
        manager.apply([spec(hn_files, "a", strength)])
        distance[strength] = np.abs(image(pipe) - base).mean()
    assert distance[1.0] > distance[0.5] > 0


def test_several_hypernetworks_chain_and_are_loaded_once(pipe, manager, hn_files, base):
    manager.apply([spec(hn_files, "a")])
    only_a = image(pipe)
    manager.apply([spec(hn_files, "b")])
    only_b = image(pipe)
    manager.apply([spec(hn_files, "a"), spec(hn_files, "b", 0.8)])
    both = image(pipe)
    assert np.abs(both - only_a).max() > 1e-4 and np.abs(both - only_b).max() > 1e-4
    processors = pipe.unet.attn_processors
    manager.apply([spec(hn_files, "a"), spec(hn_files, "b", 0.8)])  # unchanged list: nothing reinstalled
    assert all(pipe.unet.attn_processors[n] is p for n, p in processors.items())
    assert sorted(manager.cached()) == ["sha-a", "sha-b"]
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # someone else replaced the processors: reinstall
    manager.apply([spec(hn_files, "a"), spec(hn_files, "b", 0.8)])
    assert np.array_equal(image(pipe), both)
    manager.apply([spec(hn_files, "a")])
    assert np.array_equal(image(pipe), only_a)
    manager.apply([])
    assert np.array_equal(image(pipe), base)


def test_self_attention_width_alone_applies(pipe, manager, hn_files, base):
    # 64 is only the mid block's hidden width: the file reaches self-attention, as in A1111.
    manager.apply([spec(hn_files, "mid")])
    processors = pipe.unet.attn_processors
    wrapped = [n for n, p in processors.items() if isinstance(p, HypernetworkAttnProcessor)]
    assert wrapped and all(n.startswith("mid_block.") and ".attn1." in n for n in wrapped)
    assert np.abs(image(pipe) - base).max() > 1e-4


def test_no_matching_size_warns_and_changes_nothing(pipe, manager, hn_files, base):
    warnings = manager.apply([spec(hn_files, "sd15")])
    assert len(warnings) == 1 and "sd15" in warnings[0] and "[320, 640, 768, 1280]" in warnings[0]
    assert not any(isinstance(p, HypernetworkAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert np.array_equal(image(pipe), base)


def test_cache_is_bounded(pipe, hn_files):
    manager = HypernetworkManager(pipe, max_cached=1)
    try:
        manager.apply([spec(hn_files, "a")])
        manager.apply([spec(hn_files, "b")])
        assert manager.cached() == ["sha-b"]
    finally:
        manager.clear()


def test_malicious_pickle_is_refused_before_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({768: _RunsCode(marker), "layer_structure": [1, 2, 1]}, path)
    with pytest.raises(ModelRejected, match="refusing to unpickle hypernetwork evil.pt"):
        load_hypernetwork(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, match",
    [
        ({"string_to_param": {"*": torch.zeros(1, 8)}}, "no integer size keys"),
        ({8: ({}, {}), "layer_structure": [1, 2, 1]}, "does not fit its metadata"),
        ({8: ({"linear.0.weight": torch.zeros(8, 8)},), "layer_structure": [1, 1]}, r"\[k, v\] pair"),
        ({8: ({}, {}), "layer_structure": [2, 1]}, "must start and end with 1"),
    ],
)
def test_not_a_usable_hypernetwork_is_rejected(tmp_path, content, match):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(ModelRejected, match=match) as info:
        load_hypernetwork(path)
    assert "odd.pt" in str(info.value)


def test_safetensors_is_not_a_hypernetwork_format(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"{}")
    with pytest.raises(ModelRejected, match="x.safetensors"):
        load_hypernetwork(path)


def test_infotext_and_records():
    assert infotext_params([]) == {}
    assert infotext_params([("p", "0" * 64, "anime", 1.0)]) == {"Hypernet": "anime", "Hypernet strength": None}
    assert infotext_params([("p", "0" * 64, "anime", 0.5)]) == {"Hypernet": "anime", "Hypernet strength": 0.5}
    both = infotext_params([("p", "a" * 64, "x", 0.5), ("q", "b" * 64, "y", 1)])
    assert both == {"Hypernet": "x, y", "Hypernet strength": "0.5, 1.0"}
    assert records([("p", "ab" * 32, "x", 0.5)]) == [
        {"name": "x", "strength": 0.5, "hash": "ab" * 5, "sha256": "ab" * 32}
    ]
