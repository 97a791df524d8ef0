"""Real-size architectures: the bundled configs, our exporter and the loader agree on real key names and shapes.

The fast tests build models on the meta device (no memory, no weights). The
``slow`` test writes a full-size SD1.5-shaped random checkpoint (~2 GB) with no
sidecar config, so it loads through the bundled ``container/configs/sd15``.
"""

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import container
from pipelines.checkpoint import detect_family, load_pipeline
from pipelines.ldm_export import export_state_dict

CONFIGS = Path(container.__file__).parent / "configs"
FAMILY = {"sd15": "sd1", "sd21": "sd2", "sd21-base": "sd2", "sdxl-base": "sdxl"}

# Key names and shapes of the public original checkpoints (v1-5-pruned-emaonly,
# v2-1_768-ema-pruned, sd_xl_base_1.0).
KNOWN = {
    "sd15": {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    },
    "sd21": {
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
    },
    "sdxl-base": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    },
}


def components(name: str, meta: bool = True):
    folder = CONFIGS / name
    ctx = init_empty_weights() if meta else torch.no_grad()
    with ctx:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        te2 = None
        if (folder / "text_encoder_2").is_dir():
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return unet, vae, te, te2


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_exported_real_architecture_is_detected(name):
    state = export_state_dict(FAMILY[name], *components(name))
    assert detect_family(list(state)) == FAMILY[name]
    for key, shape in KNOWN.get(name, {}).items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, (key, tuple(state[key].shape))


@pytest.mark.slow
def test_full_size_sd15_loads_through_the_bundled_config(tmp_path):
    from bench.common import write_full_sd15

    path = write_full_sd15(tmp_path / "sd15-random.safetensors")
    loaded = load_pipeline(path, device="cpu", dtype=torch.float32)
    assert loaded.family == "sd1" and loaded.config_dir.name == "sd15" and loaded.default_size == 512
    out = loaded.pipe(prompt="a photo of a cat", num_inference_steps=1, width=64, height=64, output_type="np").images
    assert out.shape == (1, 64, 64, 3)
