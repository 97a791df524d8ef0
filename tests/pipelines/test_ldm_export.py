"""Round trip: diffusers components → original single file → diffusers' own reader → same tensors, same image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from pipelines.errors import InvalidParameter
from pipelines.ldm_export import export_state_dict, save_single_file
from pipelines.tiny import build_tiny_pipeline, save_config_folder


def _export(pipe, family):
    c = pipe.components
    return export_state_dict(family, c["unet"], c["vae"], c["text_encoder"], c.get("text_encoder_2"))


def _image(pipe):
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    return pipe("a photo of a cat", generator=torch.Generator().manual_seed(1), **kwargs).images


def _round_trip(tmp_path, family, suffix):
    original = build_tiny_pipeline(family, seed=0)
    path = save_single_file(tmp_path / f"model{suffix}", _export(original, family))
    config = save_config_folder(original, tmp_path / "model.config")
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    loaded = cls.from_single_file(str(path), config=str(config), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    return original, loaded


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_round_trip_is_exact(tmp_path, family):
    original, loaded = _round_trip(tmp_path, family, ".safetensors")
    compared = 0
    for name, component in original.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        want, got = component.state_dict(), loaded.components[name].state_dict()
        assert want.keys() == got.keys(), name
        for key, tensor in want.items():
            assert torch.equal(tensor, got[key]), f"{name}.{key}"
            compared += 1
    assert compared > 400
    assert np.array_equal(_image(original), _image(loaded))


def test_ckpt_round_trip(tmp_path):
    original, loaded = _round_trip(tmp_path, "sd1", ".ckpt")
    assert torch.load(tmp_path / "model.ckpt", weights_only=True).keys() == {"state_dict"}
    for key, tensor in original.unet.state_dict().items():
        assert torch.equal(tensor, loaded.unet.state_dict()[key]), key


def test_layouts_match_the_original_key_names():
    sd1 = _export(build_tiny_pipeline("sd1"), "sd1")
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in sd1
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd1
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in sd1
    # LDM's VAE attention is a 1×1 convolution.
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4

    sd2 = _export(build_tiny_pipeline("sd2"), "sd2")
    prefix = "cond_stage_model.model."
    assert prefix + "token_embedding.weight" in sd2
    assert sd2[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    # OpenCLIP has one more layer than SD2's text encoder (the skipped last one).
    assert prefix + "transformer.resblocks.2.mlp.c_proj.bias" in sd2
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd2)

    xl = _export(build_tiny_pipeline("sdxl"), "sdxl")
    assert "model.diffusion_model.label_emb.0.0.weight" in xl
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in xl
    assert xl["conditioner.embedders.1.model.text_projection"].shape == (20, 20)
    assert "conditioner.embedders.1.model.transformer.resblocks.1.ln_2.bias" in xl
    assert "conditioner.embedders.1.model.transformer.resblocks.2.ln_2.bias" not in xl


def test_bad_arguments(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    with pytest.raises(InvalidParameter, match="family"):
        export_state_dict("sd3", pipe.unet, pipe.vae, pipe.text_encoder)
    with pytest.raises(InvalidParameter, match="text_encoder_2"):
        export_state_dict("sdxl", pipe.unet, pipe.vae, pipe.text_encoder)
    with pytest.raises(InvalidParameter, match="model.bin"):
        save_single_file(tmp_path / "model.bin", {"x": torch.zeros(1)})
    assert not list(tmp_path.iterdir())


def test_tiny_models_are_deterministic():
    a, b, c = (build_tiny_pipeline("sdxl", seed=s) for s in (0, 0, 1))
    for key, tensor in a.unet.state_dict().items():
        assert torch.equal(tensor, b.unet.state_dict()[key])
    assert torch.equal(a.text_encoder_2.state_dict()["text_projection.weight"], b.text_encoder_2.state_dict()["text_projection.weight"])
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)
