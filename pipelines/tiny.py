"""Seeded tiny random-weight Stable Diffusion models, for tests and the demo server.

The shapes follow the real families (SD1 CLIP text encoder, SD2 OpenCLIP with
linear attention projections, SDXL's two text encoders and text_time
embedding, a VAE with the real factor 8) at a size where a 64×64, 2-step call
takes a fraction of a second on a CPU.  :func:`write_checkpoint` writes them the
way users ship checkpoints: one original-layout file, plus a ``<stem>.config/``
folder with the diffusers configs (no weights) that lets us load it offline.

CLI: ``python -m pipelines.tiny --models ./models --name demo-sd15-tiny --family sd1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from pipelines.errors import InvalidParameter
from pipelines.ldm_export import FAMILIES, export_state_dict, save_single_file

# Text encoder widths.  SDXL's two must differ: diffusers tells them apart in a
# single file by comparing position-embedding widths with each model's config.
_TEXT_WIDTH = {"sd1": (32,), "sd2": (32,), "sdxl": (12, 20)}
_WORDS = "a an the of and in on with photo portrait cat dog man woman red blue green landscape painting".split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte-level alphabet: printable bytes map to themselves, the rest shift past 255.

    Ordered as CLIP orders its vocabulary (printable bytes first, so "!" is id 0).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in mapping):
        mapping[b] = chr(256 + extra)
    return mapping


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A small CLIP-style BPE vocabulary: all bytes (alone and word-final) plus merges for a few words."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in _WORDS:
        # Merge left to right, the last piece carrying the end-of-word marker like CLIP's.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            joined = pieces[0] + pieces[1]
            if merge not in merges:
                merges.append(merge)
                if joined not in tokens:
                    tokens.append(joined)
            pieces = [joined] + pieces[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    # Built from memory; save_pretrained writes vocab.json + merges.txt into the config folder.
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], pad_token=pad_token)
    tok.model_max_length = 77
    return tok


def _text_encoder(width: int, vocab: dict[str, int], *, act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=width // 4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection_dim or width,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return cls(config).eval()


def _unet(family: str):
    from diffusers import UNet2DConditionModel

    common = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=32)
    if family == "sd1":
        # As SD1: attention in the high-resolution blocks, conv projections, 8 heads.
        return UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,
        )
    if family == "sd2":
        return UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
        )
    # As SDXL: no attention at the highest resolution, deeper transformers below.
    return UNet2DConditionModel(
        **common,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + _TEXT_WIDTH["sdxl"][1],
    )


def _vae(family: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    ).eval()


def _scheduler(family: str):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    beta = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    # The schedulers the reference repositories ship: PNDM for SD1/SD2, Euler for SDXL.
    if family == "sdxl":
        return EulerDiscreteScheduler(**beta, timestep_spacing="leading", steps_offset=1)
    return PNDMScheduler(**beta, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def build_tiny_components(family: str, seed: int = 0) -> dict:
    """Tiny random components for ``family`` ("sd1", "sd2", "sdxl"); same seed → identical weights.

    Returns the keyword arguments of the family's diffusers pipeline (without
    safety checker entries): unet, vae, text_encoder(s), tokenizer(s), scheduler.
    The global torch RNG is left untouched.
    """
    if family not in FAMILIES:
        raise InvalidParameter(f"unknown family {family!r}; expected one of {FAMILIES}", field="family")
    vocab, _ = _vocab_and_merges()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = {"unet": _unet(family).eval(), "vae": _vae(family), "scheduler": _scheduler(family)}
        if family == "sdxl":
            w1, w2 = _TEXT_WIDTH["sdxl"]
            parts["text_encoder"] = _text_encoder(w1, vocab, act="quick_gelu")
            parts["text_encoder_2"] = _text_encoder(w2, vocab, act="gelu", projection_dim=w2)
            parts["tokenizer"] = _tokenizer("<|endoftext|>")
            parts["tokenizer_2"] = _tokenizer("!")  # SDXL's OpenCLIP tokenizer pads with "!"
        else:
            act = "quick_gelu" if family == "sd1" else "gelu"
            parts["text_encoder"] = _text_encoder(_TEXT_WIDTH[family][0], vocab, act=act)
            parts["tokenizer"] = _tokenizer("<|endoftext|>")
    return parts


def build_tiny_pipeline(family: str, seed: int = 0):
    """The family's diffusers pipeline around :func:`build_tiny_components` (safety checker off)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = build_tiny_components(family, seed)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save_tokenizer(tok, folder: Path) -> None:
    """tokenizer.json + configs, and the vocab.json / merges.txt pair the Hub and bundled folders carry."""
    tok.save_pretrained(folder)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def save_config_folder(pipe, folder: str | os.PathLike) -> Path:
    """Write a diffusers config folder for ``pipe`` — configs and tokenizers, no weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)  # model_index.json
    for name, component in pipe.components.items():
        if component is None:
            continue
        if name.startswith("tokenizer"):
            _save_tokenizer(component, folder / name)
        elif hasattr(component, "save_config"):  # diffusers models and schedulers
            component.save_config(folder / name)
        else:  # transformers models: the config alone
            component.config.save_pretrained(folder / name)
    return folder


def write_checkpoint(folder, stem: str, family: str, seed: int = 0, fmt: str = "safetensors") -> Path:
    """Write ``<folder>/<stem>.<fmt>`` (original layout) and its ``<stem>.config/`` folder.

    ``fmt`` is "safetensors" or "ckpt".  Returns the checkpoint path.  Both are
    written under temporary names and renamed, so a partial write never looks done.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt not in ("safetensors", "ckpt"):
        raise InvalidParameter(f"fmt must be 'safetensors' or 'ckpt', not {fmt!r}", field="fmt")
    pipe = build_tiny_pipeline(family, seed)
    parts = pipe.components
    state = export_state_dict(family, parts["unet"], parts["vae"], parts["text_encoder"], parts.get("text_encoder_2"))
    config_dir = folder / f"{stem}.config"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{stem}.config-", dir=folder))
    try:
        save_config_folder(pipe, tmp_dir)
        shutil.rmtree(config_dir, ignore_errors=True)
        os.replace(tmp_dir, config_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return save_single_file(folder / f"{stem}.{fmt}", state)


def main(argv: list[str] | None = None) -> int:
    """CLI: write a tiny checkpoint into ``<models>/Stable-diffusion/`` unless it is already there."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="./models", help="model store folder (A1111 layout)")
    parser.add_argument("--name", default="demo-sd15-tiny", help="checkpoint file stem")
    parser.add_argument("--family", default="sd1", choices=FAMILIES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", default="safetensors", choices=("safetensors", "ckpt"))
    args = parser.parse_args(argv)
    target = Path(args.models) / "Stable-diffusion"
    path = target / f"{args.name}.{args.format}"
    if path.is_file() and (target / f"{args.name}.config" / "model_index.json").is_file():
        print(f"{path} already exists, skipping")
        return 0
    write_checkpoint(target, args.name, args.family, seed=args.seed, fmt=args.format)
    print(f"wrote {path} and {target / (args.name + '.config')}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
