"""The bundled diffusers config folders describe the real public architectures.

Every component is built on the meta device (no memory, no weights) and its
parameter count compared with the real model's published count, so a wrong
layer count, width or head size fails here rather than as a shape mismatch
when a user's checkpoint is loaded. Offline and CPU-only; ~10 s.
"""

from __future__ import annotations

import gzip
import importlib
import json
import os
import shutil
import zipfile
from functools import lru_cache
from pathlib import Path

import pytest

from container import build_tokenizers

CONFIGS = Path(build_tokenizers.__file__).resolve().parent / "configs"
SHARED = CONFIGS / build_tokenizers.SHARED_DIR_NAME
FAMILIES = ("sd15", "sd21", "sd21-base", "sdxl-base")

# Published parameter counts of the real models (diffusers / transformers
# classes, fp32 checkpoints), independent of these configs.
UNET_SD1 = 859_520_964
UNET_SD2 = 865_910_724
UNET_SDXL = 2_567_463_684
VAE_KL_F8 = 83_653_863
CLIP_L_TEXT = 123_060_480  # CLIPTextModel, ViT-L/14 text tower
OPENCLIP_H_TEXT_23 = 340_387_840  # ViT-H text tower without its last layer
OPENCLIP_BIGG_TEXT_PROJ = 694_659_840  # ViT-bigG text tower + text_projection

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat"
EOT, BANG = 49407, 0  # "<|endoftext|>", "!"

TEXT_ENCODERS = {
    # (family, subfolder): (class name, params, layers, width, heads, act, projection_dim)
    ("sd15", "text_encoder"): ("CLIPTextModel", CLIP_L_TEXT, 12, 768, 12, "quick_gelu", 768),
    ("sd21", "text_encoder"): ("CLIPTextModel", OPENCLIP_H_TEXT_23, 23, 1024, 16, "gelu", 512),
    ("sd21-base", "text_encoder"): ("CLIPTextModel", OPENCLIP_H_TEXT_23, 23, 1024, 16, "gelu", 512),
    ("sdxl-base", "text_encoder"): ("CLIPTextModel", CLIP_L_TEXT, 12, 768, 12, "quick_gelu", 768),
    ("sdxl-base", "text_encoder_2"): (
        "CLIPTextModelWithProjection", OPENCLIP_BIGG_TEXT_PROJ, 32, 1280, 20, "gelu", 1280,
    ),
}

TOKENIZERS = {
    ("sd15", "tokenizer"): ("<|endoftext|>", EOT),
    ("sd21", "tokenizer"): ("!", BANG),
    ("sd21-base", "tokenizer"): ("!", BANG),
    ("sdxl-base", "tokenizer"): ("<|endoftext|>", EOT),
    ("sdxl-base", "tokenizer_2"): ("!", BANG),
}


def _index(family: str) -> dict:
    return json.loads((CONFIGS / family / "model_index.json").read_text())


def _components(family: str) -> dict[str, tuple[str, str]]:
    """Non-null components of a model_index.json: name -> (library, class)."""
    return {
        name: tuple(value)
        for name, value in _index(family).items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is not None
    }


def _param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@lru_cache(maxsize=None)
def _meta_model(family: str, subfolder: str):
    """Build one component on the meta device from its bundled config."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig

    library, class_name = _components(family)[subfolder]
    cls = getattr(importlib.import_module(library), class_name)
    with init_empty_weights():
        if library == "transformers":
            return cls(CLIPTextConfig.from_pretrained(CONFIGS / family / subfolder))
        return cls.from_config(cls.load_config(CONFIGS / family / subfolder))


# --- model_index.json --------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_model_index_names_existing_subfolders(family):
    folder = CONFIGS / family
    components = _components(family)
    for name, (library, class_name) in components.items():
        assert getattr(importlib.import_module(library), class_name), (family, name)
        marker = "scheduler_config.json" if name == "scheduler" else (
            "tokenizer_config.json" if name.startswith("tokenizer") else "config.json"
        )
        assert (folder / name / marker).is_file(), f"{family}/{name}/{marker} missing"
    on_disk = {p.name for p in folder.iterdir() if p.is_dir()}
    assert on_disk == set(components), f"{family}: folders {on_disk} vs index {set(components)}"


@pytest.mark.parametrize("family", FAMILIES)
def test_model_index_satisfies_its_pipeline_class(family):
    import diffusers

    index = _index(family)
    pipeline_cls = getattr(diffusers, index["_class_name"])
    expected, _ = pipeline_cls._get_signature_keys(pipeline_cls)
    missing = set(expected) - set(_components(family)) - set(pipeline_cls._optional_components)
    assert not missing, f"{family}: {index['_class_name']} needs {missing}"
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl-base" else "StableDiffusionPipeline")


# --- UNet ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "params", "sample_size", "context", "linear_proj"),
    [
        ("sd15", UNET_SD1, 64, 768, False),
        ("sd21", UNET_SD2, 96, 1024, True),
        ("sd21-base", UNET_SD2, 64, 1024, True),
        ("sdxl-base", UNET_SDXL, 128, 2048, True),
    ],
)
def test_unet_matches_real_architecture(family, params, sample_size, context, linear_proj):
    unet = _meta_model(family, "unet")
    cfg = unet.config
    assert unet.device.type == "meta"
    assert _param_count(unet) == params
    assert cfg.sample_size == sample_size
    assert cfg.cross_attention_dim == context
    assert bool(cfg.use_linear_projection) is linear_proj
    assert (cfg.in_channels, cfg.out_channels, cfg.layers_per_block) == (4, 4, 2)


def test_sd_unet_attention_heads():
    # SD1: 8 heads everywhere (attention_head_dim is really the head count);
    # SD2: 64-channel heads, i.e. 5/10/20/20 heads per level.
    assert _meta_model("sd15", "unet").config.attention_head_dim == 8
    for family in ("sd21", "sd21-base"):
        assert list(_meta_model(family, "unet").config.attention_head_dim) == [5, 10, 20, 20]
    # The 768-v model needs fp32 attention; the 512 base model was not set so.
    assert _meta_model("sd21", "unet").config.upcast_attention is True
    assert not _meta_model("sd21-base", "unet").config.upcast_attention


def test_sdxl_unet_structure():
    cfg = _meta_model("sdxl-base", "unet").config
    assert list(cfg.block_out_channels) == [320, 640, 1280]
    assert list(cfg.transformer_layers_per_block) == [1, 2, 10]
    assert list(cfg.attention_head_dim) == [5, 10, 20]
    assert cfg.addition_embed_type == "text_time"
    assert cfg.addition_time_embed_dim == 256
    # pooled bigG embedding (1280) + 6 size/crop conditions * 256
    assert cfg.projection_class_embeddings_input_dim == 1280 + 6 * 256


# --- VAE ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "scaling_factor", "sample_size"),
    [("sd15", 0.18215, 512), ("sd21", 0.18215, 768), ("sd21-base", 0.18215, 512), ("sdxl-base", 0.13025, 1024)],
)
def test_vae_matches_real_architecture(family, scaling_factor, sample_size):
    vae = _meta_model(family, "vae")
    assert _param_count(vae) == VAE_KL_F8
    assert list(vae.config.block_out_channels) == [128, 256, 512, 512]
    assert vae.config.latent_channels == 4
    assert vae.config.scaling_factor == scaling_factor
    assert vae.config.sample_size == sample_size
    assert vae.config.force_upcast is True


# --- text encoders ------------------------------------------------------------


@pytest.mark.parametrize(("family", "subfolder"), list(TEXT_ENCODERS))
def test_text_encoder_matches_real_architecture(family, subfolder):
    class_name, params, layers, width, heads, act, projection = TEXT_ENCODERS[(family, subfolder)]
    model = _meta_model(family, subfolder)
    cfg = model.config
    assert type(model).__name__ == class_name
    assert _param_count(model) == params
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (layers, width, heads)
    assert cfg.intermediate_size == 4 * width
    assert cfg.hidden_act == act
    assert cfg.projection_dim == projection
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (49408, 77)


def test_sdxl_context_is_both_encoders_concatenated():
    te1 = _meta_model("sdxl-base", "text_encoder").config.hidden_size
    te2 = _meta_model("sdxl-base", "text_encoder_2").config.hidden_size
    assert te1 + te2 == _meta_model("sdxl-base", "unet").config.cross_attention_dim


# --- tokenizers ---------------------------------------------------------------


@pytest.mark.parametrize(("family", "subfolder"), list(TOKENIZERS))
def test_tokenizer_loads_offline_with_real_ids(family, subfolder):
    from transformers import CLIPTokenizer

    pad_token, pad_id = TOKENIZERS[(family, subfolder)]
    tokenizer = CLIPTokenizer.from_pretrained(CONFIGS / family / subfolder, local_files_only=True)
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == 49408
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == (pad_token, pad_id)
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert padded == CAT_IDS + [pad_id] * (77 - len(CAT_IDS))


def test_openclip_pad_token_quirk_is_the_hub_behaviour():
    """'!' as pad special token splits every '!' out as id 0 (diffusers#4153).

    The CLIP-L tokenizer gives the real BPE ids; documented in configs/README.md.
    """
    from transformers import CLIPTokenizer

    clip_l = CLIPTokenizer.from_pretrained(CONFIGS / "sd15" / "tokenizer")
    openclip = CLIPTokenizer.from_pretrained(CONFIGS / "sdxl-base" / "tokenizer_2")
    assert clip_l("! !! !!!").input_ids == [49406, 256, 748, 995, 49407]
    assert openclip("! !! !!!").input_ids == [49406] + [0] * 6 + [49407]


@pytest.mark.parametrize(("family", "subfolder"), list(TOKENIZERS))
def test_tokenizer_bpe_files_are_relative_links_to_shared_copy(family, subfolder):
    folder = CONFIGS / family / subfolder
    for name in build_tokenizers.SHARED_FILES:
        link = folder / name
        assert link.is_symlink(), f"{link} should be a symlink"
        target = os.readlink(link)
        assert not os.path.isabs(target)
        assert target == f"../../{build_tokenizers.SHARED_DIR_NAME}/{name}"
        assert link.resolve() == (SHARED / name).resolve()


def test_shared_bpe_files_are_complete():
    vocab = json.loads((SHARED / "vocab.json").read_text(encoding="utf-8"))
    merges = (SHARED / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert merges[0] == build_tokenizers.MERGES_HEADER
    assert len(merges) - 1 == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert (SHARED / "LICENSE-CLIP-BPE.txt").read_text().count("MIT License") == 1


# --- schedulers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "prediction_type"),
    [("sd15", "epsilon"), ("sd21", "v_prediction"), ("sd21-base", "epsilon"), ("sdxl-base", "epsilon")],
)
def test_scheduler_has_real_training_schedule(family, prediction_type):
    library, class_name = _components(family)["scheduler"]
    scheduler = getattr(importlib.import_module(library), class_name).from_pretrained(
        CONFIGS / family, subfolder="scheduler", local_files_only=True
    )
    cfg = scheduler.config
    assert cfg.prediction_type == prediction_type
    assert cfg.beta_schedule == "scaled_linear"
    assert (cfg.beta_start, cfg.beta_end) == (0.00085, 0.012)
    assert cfg.num_train_timesteps == 1000
    assert cfg.steps_offset == 1


# --- build_tokenizers.py ------------------------------------------------------


def test_byte_symbols_are_printable_and_distinct():
    symbols = build_tokenizers.byte_symbols()
    assert len(symbols) == len(set(symbols)) == 256
    assert all(s.isprintable() and not s.isspace() for s in symbols)
    assert symbols[0] == "!" and symbols[-1] == chr(256 + 67)  # 68 bytes need stand-ins


def test_build_regenerates_committed_files(tmp_path):
    """Re-derive from a wheel holding a gz rebuilt out of merges.txt: same bytes."""
    merges_txt = (SHARED / "merges.txt").read_text(encoding="utf-8").splitlines()
    # The real gz has a different header line and ~213k further merges that
    # CLIP never uses; both must be ignored.
    gz_bytes = gzip.compress("\n".join(["#any header", *merges_txt[1:], "un used"]).encode())
    fake_wheel = tmp_path / "open_clip_torch-0-py3-none-any.whl"
    with zipfile.ZipFile(fake_wheel, "w") as wheel:
        wheel.writestr("open_clip/" + build_tokenizers.BPE_NAME, gz_bytes)

    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS / "sd15", configs / "sd15", symlinks=True)
    assert build_tokenizers.main([str(fake_wheel), "--configs", str(configs)]) == 0

    for name in build_tokenizers.SHARED_FILES:
        assert (configs / "_clip_bpe" / name).read_bytes() == (SHARED / name).read_bytes()
        assert (configs / "sd15" / "tokenizer" / name).read_bytes() == (SHARED / name).read_bytes()
    # idempotent: a second run leaves links alone
    assert build_tokenizers.link_tokenizer_folders(configs, configs / "_clip_bpe") == []


def test_build_rejects_short_bpe_file(tmp_path):
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#header\na b\nc d\n"))
    with pytest.raises(ValueError, match="merge"):
        build_tokenizers.parse_merges(short.read_bytes())
