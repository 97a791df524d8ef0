"""Textual inversion on the tiny models: every file format, word-boundary use, multi-vector, SDXL parts, widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.errors import ModelRejected
from pipelines.infotext import build_infotext
from pipelines.textual_inversion import (
    EmbeddingManager,
    EmbeddingSpec,
    find_embedding_names,
    infotext_params,
    read_embedding,
    ti_hashes,
)
from pipelines.tiny import build_tiny_pipeline
from tests.support.network_files import random_vectors, write_embedding

torch.set_num_threads(1)

SD1_WIDTH, SDXL_L, SDXL_G = 32, 12, 20
FORMATS = {"a1111-pt": ".pt", "a1111-safetensors": ".safetensors",
           "diffusers-bin": ".bin", "diffusers-safetensors": ".safetensors"}


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def image(pipe, prompt):
    return pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def spec(path, sha="1" * 64):
    return EmbeddingSpec(path, sha, path.stem)


@pytest.fixture(scope="module")
def sd1_images():
    """Images of the untouched tiny SD1 model, by prompt."""
    pipe = build_tiny_pipeline("sd1", seed=0)
    prompts = ["a photo of a cat", "a photo of myemb cat", "a photo of myembx cat"]
    return {p: image(pipe, p) for p in prompts}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_reads_the_same_vectors(tmp_path, fmt):
    vectors = random_vectors(2, SD1_WIDTH, seed=3)
    path = write_embedding(tmp_path / f"myemb{FORMATS[fmt]}", fmt, vectors)
    assert torch.equal(read_embedding(path)[""], vectors)


def test_sdxl_and_bare_tensor_files(tmp_path):
    l, g = random_vectors(2, SDXL_L, 1), random_vectors(2, SDXL_G, 2)
    parts = read_embedding(write_embedding(tmp_path / "x.safetensors", "sdxl", clip_l=l, clip_g=g))
    assert torch.equal(parts["clip_l"], l) and torch.equal(parts["clip_g"], g)
    torch.save(torch.ones(SD1_WIDTH), tmp_path / "bare.pt")
    assert read_embedding(tmp_path / "bare.pt")[""].shape == (1, SD1_WIDTH)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_embedding_changes_the_image_only_where_named(tmp_path, fmt, sd1_images):
    pipe = build_tiny_pipeline("sd1", seed=0)
    path = write_embedding(tmp_path / f"myemb{FORMATS[fmt]}", fmt, random_vectors(1, SD1_WIDTH, seed=5))
    [emb] = EmbeddingManager(pipe, "sd1").ensure([spec(path)])
    assert (emb.name, emb.token, emb.vectors, emb.parts) == ("myemb", "myemb", 1, ("",))
    assert np.array_equal(image(pipe, "a photo of a cat"), sd1_images["a photo of a cat"])
    assert np.array_equal(image(pipe, "a photo of myembx cat"), sd1_images["a photo of myembx cat"])
    named = image(pipe, "a photo of myemb cat")
    assert np.abs(named - sd1_images["a photo of myemb cat"]).max() > 1e-3
    # every format carries the same vectors to the same place
    other = build_tiny_pipeline("sd1", seed=0)
    reference = write_embedding(tmp_path / "ref" / "myemb.pt", "a1111-pt", random_vectors(1, SD1_WIDTH, seed=5))
    EmbeddingManager(other, "sd1").ensure([spec(reference)])
    assert np.array_equal(image(other, "a photo of myemb cat"), named)


def test_multi_vector_embedding_uses_every_vector(tmp_path):
    vectors = random_vectors(3, SD1_WIDTH, seed=7)
    multi = build_tiny_pipeline("sd1", seed=0)
    manager = EmbeddingManager(multi, "sd1")
    [emb] = manager.ensure([spec(write_embedding(tmp_path / "MyEmb.pt", "a1111-pt", vectors))])
    assert emb.vectors == 3 and emb.tokens == ["myemb", "myemb_1", "myemb_2"]
    ids = multi.tokenizer(multi.maybe_convert_prompt("a myemb cat", multi.tokenizer)).input_ids
    assert ids[2:5] == multi.tokenizer.convert_tokens_to_ids(emb.tokens)
    rows = multi.text_encoder.get_input_embeddings().weight[ids[2:5]]
    torch.testing.assert_close(rows, vectors)

    single = build_tiny_pipeline("sd1", seed=0)
    EmbeddingManager(single, "sd1").ensure([spec(write_embedding(tmp_path / "one" / "myemb.pt", "a1111-pt", vectors[:1]))])
    assert np.abs(image(multi, "a photo of myemb cat") - image(single, "a photo of myemb cat")).max() > 1e-4
    # any letter case names it; canonical_prompt lets diffusers expand all three vectors
    assert manager.canonical_prompt("a photo of MyEmb cat, <lora:MyEmb:1>") == "a photo of myemb cat, <lora:MyEmb:1>"
    assert np.array_equal(image(multi, manager.canonical_prompt("a photo of MYEMB cat")),
                          image(multi, "a photo of myemb cat"))


def test_sdxl_embedding_loads_each_part_into_its_encoder(tmp_path):
    pipe = build_tiny_pipeline("sdxl", seed=0)
    base = {p: image(pipe, p) for p in ("a photo of a cat", "a photo of xlemb cat")}
    l, g = random_vectors(2, SDXL_L, 1), random_vectors(2, SDXL_G, 2)
    path = write_embedding(tmp_path / "xlemb.safetensors", "sdxl", clip_l=l, clip_g=g)
    [emb] = EmbeddingManager(pipe, "sdxl").ensure([spec(path)])
    assert emb.parts == ("clip_l", "clip_g") and emb.vectors == 2
    for tokenizer, encoder, vectors in ((pipe.tokenizer, pipe.text_encoder, l),
                                        (pipe.tokenizer_2, pipe.text_encoder_2, g)):
        ids = tokenizer.convert_tokens_to_ids(emb.tokens)
        torch.testing.assert_close(encoder.get_input_embeddings().weight[ids], vectors)
    assert np.array_equal(image(pipe, "a photo of a cat"), base["a photo of a cat"])
    assert np.abs(image(pipe, "a photo of xlemb cat") - base["a photo of xlemb cat"]).max() > 1e-3


@pytest.mark.parametrize(
    "family, make, words",
    [
        ("sd1", lambda p: write_embedding(p / "big.pt", "a1111-pt", random_vectors(1, 768)), ["big.pt", "768", "32"]),
        ("sd1", lambda p: write_embedding(p / "big.safetensors", "sdxl", clip_l=random_vectors(1, 768),
                                          clip_g=random_vectors(1, 1280)), ["big.safetensors", "SDXL", "768", "1280", "32"]),
        ("sdxl", lambda p: write_embedding(p / "big.pt", "a1111-pt", random_vectors(1, 32)), ["big.pt", "32", "12", "20"]),
        ("sdxl", lambda p: write_embedding(p / "big.safetensors", "sdxl", clip_l=random_vectors(1, 768),
                                           clip_g=random_vectors(1, 1280)), ["big.safetensors", "768", "12"]),
    ],
)
def test_wrong_width_is_rejected_naming_file_and_widths(tmp_path, family, make, words):
    pipe = build_tiny_pipeline(family, seed=0)
    size = len(pipe.tokenizer)
    with pytest.raises(ModelRejected) as info:
        EmbeddingManager(pipe, family).ensure([spec(make(tmp_path))])
    for word in words:
        assert word in str(info.value)
    assert len(pipe.tokenizer) == size  # nothing half-loaded


def test_loaded_once_and_replaced_when_the_file_changes(tmp_path):
    pipe = build_tiny_pipeline("sd1", seed=0)
    manager = EmbeddingManager(pipe, "sd1")
    path = write_embedding(tmp_path / "myemb.pt", "a1111-pt", random_vectors(2, SD1_WIDTH, seed=1))
    manager.ensure([spec(path, "a" * 64)])
    size = len(pipe.tokenizer)
    manager.ensure([spec(path, "a" * 64), spec(path, "a" * 64)])
    assert len(pipe.tokenizer) == size
    new = random_vectors(2, SD1_WIDTH, seed=2)
    write_embedding(path, "a1111-pt", new)
    [emb] = manager.ensure([spec(path, "b" * 64)])
    assert emb.sha256 == "b" * 64 and len(pipe.tokenizer) == size
    ids = pipe.tokenizer.convert_tokens_to_ids(emb.tokens)
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], new)


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"string_to_param": {"*": _RunsCode(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(ModelRejected, match="refusing to unpickle embedding evil.pt"):
        read_embedding(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"a": torch.zeros(3), "b": torch.zeros(3)}, tmp_path / "two.pt")
    with pytest.raises(ModelRejected, match="two.pt: not a textual inversion embedding"):
        read_embedding(tmp_path / "two.pt")
    (tmp_path / "emb.png").write_bytes(b"\x89PNG")
    with pytest.raises(ModelRejected, match="emb.png"):
        read_embedding(tmp_path / "emb.png")


def test_name_that_is_already_a_vocabulary_token_is_rejected(tmp_path):
    pipe = build_tiny_pipeline("sd1", seed=0)
    path = write_embedding(tmp_path / "a.pt", "a1111-pt", random_vectors(1, SD1_WIDTH))  # "a" is a CLIP token
    with pytest.raises(ModelRejected, match="a.pt: the name 'a' is already a token"):
        EmbeddingManager(pipe, "sd1").ensure([spec(path)])


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a photo of myemb, (myemb:1.2)", ["myemb"]),
        ("a photo of myembx", []),
        ("xmyemb and myemb_2", []),
        ("MyEmb in capitals", ["myemb"]),
        ("[myemb:other:5] then (bad-hands:0.8)", ["myemb", "other", "bad-hands"]),
        ("bad-hands-v2", ["bad-hands-v2"]),  # the longest name wins where several could match
        ("bad-hands-v2x", ["bad-hands"]),
        ("<lora:myemb:1> a cat", []),  # extra-network tags are not prompt text
        ("\\(myemb\\) BREAK other", ["myemb", "other"]),
        ("", []),
    ],
)
def test_find_embedding_names(prompt, expected):
    assert find_embedding_names(prompt, ["other", "myemb", "bad-hands", "bad-hands-v2"]) == expected


def test_ti_hashes_follow_a1111():
    used = [("myemb", "0123456789abcdef" * 4), ("odd:name,x", "f" * 64), ("myemb", "0123456789abcdef" * 4)]
    assert ti_hashes(used) == "myemb: 0123456789ab, oddnamex: ffffffffffff"
    assert ti_hashes([]) is None and infotext_params([]) == {}
    text = build_infotext("p", None, {"Steps": 2, **infotext_params(used[:1])})
    assert text == 'p\nSteps: 2, TI hashes: "myemb: 0123456789ab"'
