"""Single-file checkpoints: family detection, safe reading, offline loading, SD2 v-prediction choice."""

from __future__ import annotations

import json
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines import checkpoint
from pipelines.checkpoint import detect_family, load_pipeline, read_keys, read_state_dict, unet_predicts_v
from pipelines.errors import ModelNotFound, ModelRejected


class _RunsCode:
    """Unpickling this would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _generate(pipe):
    return pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_detects_all_three_families(tiny_sd1_checkpoint, tiny_sdxl_checkpoint, tiny_sd2_checkpoint):
    assert detect_family(read_keys(tiny_sd1_checkpoint)) == "sd1"
    assert detect_family(read_keys(tiny_sd2_checkpoint)) == "sd2"
    assert detect_family(read_keys(tiny_sdxl_checkpoint)) == "sdxl"


@pytest.mark.parametrize(
    "keys, looks_like",
    [
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_unet_x.alpha"], "LoRA"),
        (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.text_projection"], "refiner"),
        (["model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"], "Stable Diffusion 3"),
        (["control_model.input_hint_block.0.weight"], "ControlNet"),
        (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"], "VAE"),
        (["model.diffusion_model.label_emb.0.0.weight"], "UNet without text encoder"),
        (["something.else"], "unknown layout"),
    ],
)
def test_rejects_what_is_not_a_checkpoint(keys, looks_like):
    with pytest.raises(ModelRejected, match=looks_like) as info:
        detect_family(keys, "thing.safetensors")
    assert "thing.safetensors" in info.value.message


@pytest.mark.parametrize("stem", ["tiny-sd1", "tiny-sdxl"])
def test_load_and_generate_with_own_config(tiny_model_store, stem, tmp_path, no_network):
    path = tiny_model_store / "Stable-diffusion" / f"{stem}.safetensors"
    # An empty configs root proves the <stem>.config/ beside the file is what got used.
    loaded = load_pipeline(path, configs_root=tmp_path)
    assert loaded.config_dir == path.with_name(f"{stem}.config")
    assert loaded.family == stem.removeprefix("tiny-")
    assert loaded.prediction_type == "epsilon"
    assert loaded.default_size == 32 * 8
    assert getattr(loaded.pipe, "safety_checker", None) is None
    image = _generate(loaded.pipe)
    assert image.shape == (1, 64, 64, 3)


def test_ckpt_loads_through_weights_only(tmp_path):
    from pipelines.tiny import write_checkpoint

    path = write_checkpoint(tmp_path, "tiny", "sd1", fmt="ckpt")
    assert detect_family(read_keys(path)) == "sd1"
    loaded = load_pipeline(path, configs_root=tmp_path / "none")
    assert _generate(loaded.pipe).shape == (1, 64, 64, 3)


def test_plain_tensor_ckpt(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16)}
    torch.save({"state_dict": tensors, "global_step": 10}, tmp_path / "w.ckpt")
    torch.save(tensors, tmp_path / "w.pt")
    for name in ("w.ckpt", "w.pt"):
        got = read_state_dict(tmp_path / name)
        assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
        assert read_keys(tmp_path / name) == ["a", "b"]


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_refuses_a_pickle_that_runs_code(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.zeros(1), "x": _RunsCode(marker)}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    for reader in (read_state_dict, read_keys, load_pipeline):
        with pytest.raises(ModelRejected, match="refusing to unpickle evil.ckpt"):
            reader(path)
    assert not marker.exists()


def test_truncated_safetensors_is_rejected(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(path))
    data = path.read_bytes()
    for name, size in (("cut.safetensors", len(data) - 100), ("head.safetensors", 20)):
        bad = tmp_path / name
        bad.write_bytes(data[:size])
        for reader in (read_state_dict, read_keys, load_pipeline):
            with pytest.raises(ModelRejected, match=name):
                reader(bad)


def test_truncated_ckpt_is_rejected(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(64, 64)}}, tmp_path / "full.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "full.ckpt").read_bytes()[:-200])
    for reader in (read_state_dict, read_keys):
        with pytest.raises(ModelRejected, match="cut.ckpt"):
            reader(tmp_path / "cut.ckpt")


def test_other_extensions_and_missing_files(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelRejected, match="model.bin"):
        read_state_dict(tmp_path / "model.bin")
    with pytest.raises(ModelNotFound, match="gone.safetensors"):
        read_keys(tmp_path / "gone.safetensors")


def test_missing_bundled_config_is_named(tiny_sd2_checkpoint, tmp_path):
    lone = Path(shutil.copy2(tiny_sd2_checkpoint, tmp_path / "lone.safetensors"))
    with pytest.raises(ModelRejected, match="sd21-base"):
        load_pipeline(lone, configs_root=tmp_path / "nowhere")


@pytest.fixture
def sd2_without_config(tiny_sd2_checkpoint, tmp_path):
    """The tiny SD2 file alone in a folder, plus a configs root with tiny sd21 / sd21-base folders."""
    root = tmp_path / "configs"
    own = tiny_sd2_checkpoint.with_name("tiny-sd2.config")
    shutil.copytree(own, root / "sd21-base")
    shutil.copytree(own, root / "sd21")
    sched = root / "sd21" / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps(json.loads(sched.read_text()) | {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}))
    unet = root / "sd21" / "unet" / "config.json"
    unet.write_text(json.dumps(json.loads(unet.read_text()) | {"sample_size": 48, "upcast_attention": True}))
    (tmp_path / "models").mkdir()
    return Path(shutil.copy2(tiny_sd2_checkpoint, tmp_path / "models" / "sd2.safetensors")), root


def test_sd2_v_from_yaml_with_bundled_configs(sd2_without_config):
    path, root = sd2_without_config
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    loaded = load_pipeline(path, configs_root=root)
    assert (loaded.family, loaded.prediction_type, loaded.config_dir) == ("sd2", "v_prediction", root / "sd21")
    assert loaded.default_size == 48 * 8


def test_sd2_v_from_yaml_overrides_own_config(tiny_sd2_checkpoint, tmp_path):
    path = Path(shutil.copy2(tiny_sd2_checkpoint, tmp_path / "tiny-sd2.safetensors"))
    shutil.copytree(tiny_sd2_checkpoint.with_name("tiny-sd2.config"), tmp_path / "tiny-sd2.config")
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: v\n")
    loaded = load_pipeline(path, configs_root=tmp_path / "none")
    assert loaded.prediction_type == "v_prediction"
    assert loaded.pipe.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("is_v", [True, False])
def test_sd2_heuristic_picks_the_config(sd2_without_config, monkeypatch, is_v):
    path, root = sd2_without_config
    monkeypatch.setattr(checkpoint, "unet_predicts_v", lambda unet: is_v)
    loaded = load_pipeline(path, configs_root=root)
    if is_v:
        assert (loaded.prediction_type, loaded.config_dir, loaded.default_size) == ("v_prediction", root / "sd21", 384)
        assert type(loaded.pipe.scheduler).__name__ == "DDIMScheduler"
    else:
        assert (loaded.prediction_type, loaded.config_dir, loaded.default_size) == ("epsilon", root / "sd21-base", 256)


def test_unet_predicts_v_follows_a1111():
    class FakeUNet(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift = torch.nn.Parameter(torch.tensor(shift))
            self.config = type("C", (), {"cross_attention_dim": 1024})()

        def forward(self, x, t, encoder_hidden_states):
            assert t.tolist() == [999] and encoder_hidden_states.shape == (1, 2, 1024)
            assert torch.all(x == 0.5) and x.shape == (1, 4, 8, 8)
            return type("Out", (), {"sample": x + self.shift})()

    assert unet_predicts_v(FakeUNet(-1.5)) is True
    assert unet_predicts_v(FakeUNet(-0.5)) is False
