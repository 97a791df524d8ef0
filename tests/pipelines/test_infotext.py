"""A1111 infotext: exact text, parsing, PNG chunk, and a third-party reader (sd-parsers)."""

from __future__ import annotations

import io
import zlib

import pytest
from PIL import Image

from pipelines.infotext import (
    a1111_params,
    build_infotext,
    parse_infotext,
    png_with_infotext,
    quote,
    read_infotext,
)

PROMPT = "masterpiece, a cat (wearing a hat:1.2), <lora:add_detail:0.5>"
NEGATIVE = "blurry, lowres"
# What A1111 1.10 writes for this request (txt2img API, DPM++ 2M + Automatic → Karras, clip skip 2).
EXPECTED = (
    "masterpiece, a cat (wearing a hat:1.2), <lora:add_detail:0.5>\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1234567890, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Clip skip: 2, "
    'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1'
)


def _params(**overrides):
    kwargs = dict(
        steps=20, sampler="DPM++ 2M", schedule="Karras", cfg_scale=7, seed=1234567890, width=512, height=768,
        model_hash="6ce0161689", model="v1-5-pruned-emaonly", vae_hash="735e4c3a44",
        vae="vae-ft-mse-840000-ema-pruned.safetensors", clip_skip=2,
        extra={"Lora hashes": "add_detail: 7c6bad76eb54"}, version="v1.10.1",
    )
    kwargs.update(overrides)
    return a1111_params(**kwargs)


def test_builds_a1111_infotext_exactly():
    assert build_infotext(PROMPT, NEGATIVE, _params()) == EXPECTED


def test_omission_rules():
    text = build_infotext("a cat", "", _params(clip_skip=1, vae=None, vae_hash=None, extra=None, version=None))
    assert text == (
        "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1234567890, "
        "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly"
    )
    assert "Variation seed" not in build_infotext("a", None, _params(variation_seed=5, variation_seed_strength=0))
    varied = build_infotext("a", None, _params(variation_seed=5, variation_seed_strength=0.25, clip_skip=1))
    assert "Size: 512x768, Model hash: 6ce0161689" in varied
    assert "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Variation seed: 5, Variation seed strength: 0.25" in varied


def test_quoting_follows_a1111():
    assert quote("plain value") == "plain value"
    assert quote(7.0) == "7.0"
    assert quote("a: b") == '"a: b"'
    assert quote("a, b") == '"a, b"'
    assert quote("two\nlines") == '"two\\nlines"'
    assert quote('say "hi", ok') == '"say \\"hi\\", ok"'
    assert quote("日本, 猫") == '"日本, 猫"'  # ensure_ascii=False
    text = build_infotext("p", None, {"Steps": 1, "Sampler": "Euler", "Tiling": "Tiling", "Seed": None, "X": "y"})
    assert text == "p\nSteps: 1, Sampler: Euler, Tiling, X: y"  # key == value → bare key; None dropped


def test_whole_text_is_stripped_like_a1111():
    assert build_infotext("  a cat  ", None, {"Steps": 1}) == "a cat  \nSteps: 1"


def test_parse_round_trip():
    parsed = parse_infotext(build_infotext(PROMPT, NEGATIVE, _params()))
    assert parsed["Prompt"] == PROMPT
    assert parsed["Negative prompt"] == NEGATIVE
    assert parsed["Steps"] == "20"
    assert parsed["Sampler"] == "DPM++ 2M"
    assert parsed["Schedule type"] == "Karras"
    assert parsed["CFG scale"] == "7.0"
    assert parsed["Seed"] == "1234567890"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "768")
    assert "Size" not in parsed
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert parsed["VAE"] == "vae-ft-mse-840000-ema-pruned.safetensors"
    assert parsed["Version"] == "v1.10.1"


def test_parse_multiline_prompts_and_short_last_line():
    text = (
        "line one\nline two\nNegative prompt: bad\nworse\n"
        "Steps: 5, Sampler: Euler a, Seed: 3, Hires resize: 1024x1536"
    )
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "line one\nline two"
    assert parsed["Negative prompt"] == "bad\nworse"
    assert (parsed["Hires resize-1"], parsed["Hires resize-2"]) == ("1024", "1536")
    # fewer than 3 parameters on the last line: it is part of the prompt
    assert parse_infotext("a cat\nSteps: 20, Seed: 1") == {"Prompt": "a cat\nSteps: 20, Seed: 1", "Negative prompt": ""}


def test_parse_quoted_values_with_escapes():
    params = {"Steps": 2, "Sampler": "Euler", "Note": 'he said "hi", then: left\nbye', "Seed": 9}
    parsed = parse_infotext(build_infotext("p", None, params))
    assert parsed["Note"] == params["Note"]
    assert parsed["Seed"] == "9"


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        kind, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + data) == int.from_bytes(png[pos + 8 + length:pos + 12 + length], "big")
        chunks.append((kind, data))
        pos += 12 + length
    return chunks


@pytest.fixture
def image() -> Image.Image:
    return Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)


def test_png_carries_parameters_and_is_deterministic(image):
    png = png_with_infotext(image, EXPECTED)
    assert png == png_with_infotext(image.copy(), EXPECTED)
    with Image.open(io.BytesIO(png)) as read:
        assert read.info["parameters"] == EXPECTED
        assert read.tobytes() == image.tobytes()
    assert read_infotext(png) == EXPECTED
    assert (b"tEXt", b"parameters\x00" + EXPECTED.encode("latin-1")) in _chunks(png)


def test_png_non_latin1_text_goes_to_itxt(image):
    text = build_infotext("一只猫", None, {"Steps": 1, "Sampler": "Euler", "Seed": 1})
    png = png_with_infotext(image, text)
    assert b"iTXt" in [kind for kind, _ in _chunks(png)]
    assert read_infotext(png) == text


def test_png_ignores_metadata_already_on_the_image(image):
    image.info["parameters"] = "stale"
    image.info["Software"] = "something"
    png = png_with_infotext(image, EXPECTED)
    assert read_infotext(png) == EXPECTED
    assert b"Software" not in png


def test_read_infotext_without_chunk(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert read_infotext(buffer.getvalue()) is None


def test_sd_parsers_reads_our_png(image):
    import sd_parsers  # test extra: a real A1111-metadata reader

    info = sd_parsers.ParserManager().parse(io.BytesIO(png_with_infotext(image, EXPECTED)))
    assert info is not None
    assert info.generator.value == "AUTOMATIC1111"
    assert [p.value for p in info.prompts] == [PROMPT]
    assert [p.value for p in info.negative_prompts] == [NEGATIVE]
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters["steps"] == "20"
    assert sampler.parameters["seed"] == "1234567890"
    assert sampler.parameters["cfg_scale"] == "7.0"
    assert sampler.parameters["scheduler"] == "Karras"
    assert (sampler.model.name, sampler.model.hash) == ("v1-5-pruned-emaonly", "6ce0161689")
