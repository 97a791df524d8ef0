"""A1111 conditioning on tiny models: chunks, emphasis, BREAK, schedules, clip skip, SDXL pooled."""

from __future__ import annotations

import pytest
import torch

from pipelines.conditioning import CHUNK_TOKENS, chunk_prompt, encode_prompts
from pipelines.tiny import build_tiny_pipeline

torch.set_num_threads(1)

CHUNK = CHUNK_TOKENS + 2  # 77 with BOS/EOS
STEPS = 10


def _trained_like(pipe):
    """Give the text encoders' final layer norms a bias, as trained models have.

    Freshly initialised norms have bias 0, so every output token has mean 0 and
    A1111's mean restoration would divide rounding noise by rounding noise.
    """
    gen = torch.Generator().manual_seed(0)
    for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if enc is not None:
            norm = getattr(enc, "text_model", enc).final_layer_norm
            with torch.no_grad():
                norm.bias.copy_(0.2 + 0.1 * torch.randn(norm.bias.shape, generator=gen))
    return pipe


@pytest.fixture(scope="module")
def pipes():
    """One in-memory tiny pipeline per family, built once for the module."""
    return {family: _trained_like(build_tiny_pipeline(family, seed=0)) for family in ("sd1", "sd2", "sdxl")}


def _encode(pipe, prompt, negative="", steps=STEPS, clip=1, **kw):
    return encode_prompts(pipe, prompt, negative, steps, clip, **kw)


def _pos(pipe, prompt, **kw):
    return _encode(pipe, prompt, **kw).at(0).prompt_embeds


def _diffusers(pipe, prompt, negative):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative)


def _words(n, word="cat"):
    # "cat", "dog", "red" are single tokens in the tiny vocabulary.
    return " ".join([word] * n)


# --- baseline: equal to diffusers for a short plain prompt ---------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_short_plain_prompt_equals_diffusers_encode_prompt(pipes, family):
    pipe = pipes[family]
    ours = _encode(pipe, "a red cat", "dog").at(0)
    ref = _diffusers(pipe, "a red cat", "dog")
    torch.testing.assert_close(ours.prompt_embeds, ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.negative_prompt_embeds, ref[1], rtol=0, atol=1e-6)
    if family == "sdxl":
        torch.testing.assert_close(ours.pooled, ref[2], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.negative_pooled, ref[3], rtol=0, atol=1e-6)
    else:
        assert ours.pooled is None and ours.negative_pooled is None


def test_empty_negative_is_zero_for_sdxl_only(pipes):
    # A1111 zeroes an empty SDXL negative (force_zero_embeddings); diffusers does the same only for
    # negative_prompt=None (force_zeros_for_empty_prompt), and encodes "" otherwise.
    xl = _encode(pipes["sdxl"], "a red cat", "").at(0)
    ref = _diffusers(pipes["sdxl"], "a red cat", None)
    assert not xl.negative_prompt_embeds.any() and not xl.negative_pooled.any()
    torch.testing.assert_close(xl.negative_prompt_embeds, ref[1])
    sd1 = _encode(pipes["sd1"], "a red cat", "").at(0)
    torch.testing.assert_close(sd1.negative_prompt_embeds, _diffusers(pipes["sd1"], "a red cat", "")[1], rtol=0, atol=1e-6)


# --- emphasis ------------------------------------------------------------------------------------


def _scale(a, b):
    """Least-squares c with a ≈ c·b."""
    return float((a * b).sum() / (b * b).sum())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_weight_scales_only_its_tokens_then_restores_the_mean(pipes, family):
    pipe = pipes[family]
    plain = _pos(pipe, "a cat photo")
    weighted = _pos(pipe, "a (cat:1.5) photo")
    # BOS, a, cat, photo, EOS...: "cat" is position 2.
    split = pipe.text_encoder.config.hidden_size if family == "sdxl" else plain.shape[-1]
    for sl in (slice(0, split), slice(split, None)) if family == "sdxl" else (slice(None),):
        p, w = plain[0, :, sl], weighted[0, :, sl]
        others = [i for i in range(CHUNK) if i != 2]
        c = _scale(w[others], p[others])  # the mean-restoring factor, the same everywhere
        torch.testing.assert_close(w[others], c * p[others], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w[2], 1.5 * c * p[2], rtol=1e-4, atol=1e-5)
        assert c != pytest.approx(1.0, abs=1e-6)
        assert float(w.mean()) == pytest.approx(float(p.mean()), rel=1e-4, abs=1e-6)  # A1111 restores the mean


def test_weight_one_equals_plain(pipes):
    torch.testing.assert_close(_pos(pipes["sd1"], "a (cat:1.0) photo"), _pos(pipes["sd1"], "a cat photo"), rtol=0, atol=0)


# --- long prompts, BREAK, comma back-off ---------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_long_prompt_uses_its_tail(pipes, family):
    words = ["cat"] * 110
    base = _pos(pipes[family], " ".join(words))
    words[99] = "dog"
    changed = _pos(pipes[family], " ".join(words))
    assert base.shape[1] == changed.shape[1] == 2 * CHUNK
    torch.testing.assert_close(changed[:, :CHUNK], base[:, :CHUNK], rtol=0, atol=0)
    assert not torch.allclose(changed[:, CHUNK:], base[:, CHUNK:])


def test_break_starts_a_new_chunk_and_negative_is_padded(pipes):
    pipe = pipes["sd1"]
    s = _encode(pipe, "a cat BREAK a dog", "ugly")
    e = s.at(0)
    assert s.chunk_count == 2 and e.prompt_embeds.shape[1] == e.negative_prompt_embeds.shape[1] == 2 * CHUNK
    torch.testing.assert_close(e.prompt_embeds[:, :CHUNK], _pos(pipe, "a cat"), rtol=0, atol=0)
    torch.testing.assert_close(e.prompt_embeds[:, CHUNK:], _pos(pipe, "a dog"), rtol=0, atol=0)
    # The negative keeps its own chunk and gains the empty prompt's encoding.
    torch.testing.assert_close(e.negative_prompt_embeds[:, :CHUNK], _pos(pipe, "ugly"), rtol=0, atol=0)
    torch.testing.assert_close(e.negative_prompt_embeds[:, CHUNK:], _pos(pipe, ""), rtol=0, atol=0)
    # The negative can be the longer one too.
    s2 = _encode(pipe, "a cat", "ugly BREAK blurry")
    assert s2.at(0).prompt_embeds.shape[1] == 2 * CHUNK
    torch.testing.assert_close(s2.at(0).prompt_embeds[:, CHUNK:], _pos(pipe, ""), rtol=0, atol=0)


def test_sdxl_zero_negative_is_padded_with_zeros(pipes):
    e = _encode(pipes["sdxl"], "a cat BREAK a dog", "").at(0)
    assert e.negative_prompt_embeds.shape == e.prompt_embeds.shape and not e.negative_prompt_embeds.any()


def test_chunking_breaks_and_comma_backoff(pipes):
    tok = pipes["sd1"].tokenizer
    cat, dog, comma, eos = (tok.convert_tokens_to_ids(t) for t in ("cat</w>", "dog</w>", ",</w>", "<|endoftext|>"))
    # BREAK at the start makes an empty first chunk, as in A1111.
    assert [c.tokens[:2] for c in chunk_prompt("BREAK cat", tok)] == [[eos, eos], [cat, eos]]
    # Exactly 75 tokens fit one chunk.
    assert len(chunk_prompt(_words(75), tok)) == 1
    # A comma in the last 20 tokens of a full chunk: the words after it move on.
    chunks = chunk_prompt(_words(70) + ", " + _words(10, "dog"), tok)
    assert len(chunks) == 2
    assert chunks[0].tokens[70] == comma and chunks[0].tokens[71:] == [eos] * 4
    assert chunks[1].tokens[:10] == [dog] * 10 and chunks[1].tokens[10] == eos
    # Further back than 20 tokens: no back-off, the chunk is cut at 75.
    chunks = chunk_prompt(_words(50) + ", " + _words(40, "dog"), tok)
    assert chunks[0].tokens[-1] == dog and chunks[1].tokens[:15] == [dog] * 15
    # Weights follow their tokens into the next chunk.
    chunks = chunk_prompt(_words(70) + ", (dog:1.3) " + _words(10, "dog"), tok)
    assert chunks[1].weights[0] == pytest.approx(1.3) and chunks[1].weights[1] == 1.0


def test_multi_vector_embedding_counts_and_is_not_split():
    pipe = _trained_like(build_tiny_pipeline("sd1", seed=0))
    pipe.load_textual_inversion({"string_to_param": {"*": torch.randn(3, 32)}, "name": "emb"}, token="emb")
    expand = lambda s: pipe.maybe_convert_prompt(s, pipe.tokenizer)
    emb = pipe.tokenizer.convert_tokens_to_ids(["emb", "emb_1", "emb_2"])
    chunks = chunk_prompt(_words(73) + " emb", pipe.tokenizer, expand)
    assert len(chunks) == 2 and chunks[1].tokens[:3] == emb  # 73 + 3 > 75: moved whole
    assert chunk_prompt(_words(72) + " emb", pipe.tokenizer, expand)[0].tokens[72:] == emb
    with_emb, without = _pos(pipe, "a emb cat"), _pos(pipe, "a cat")
    assert not torch.allclose(with_emb, without)


# --- prompt editing and alternation --------------------------------------------------------------


def test_prompt_editing_switches_once(pipes):
    pipe = pipes["sd1"]
    s = _encode(pipe, "a [cat:dog:0.5] photo", "", steps=STEPS)
    cat, dog = _pos(pipe, "a cat photo"), _pos(pipe, "a dog photo")
    # A1111: "cat" until step 5 inclusive (0-based model calls), "dog" from 6.
    assert s.changes_at == {6}
    assert s.positive.embeds.shape[0] == 2
    for step in range(STEPS):
        torch.testing.assert_close(s.at(step).prompt_embeds, cat if step <= 5 else dog, rtol=0, atol=1e-6)


def test_alternation_switches_every_step(pipes):
    pipe = pipes["sd1"]
    s = _encode(pipe, "a [cat|dog] photo", "", steps=4)
    cat, dog = _pos(pipe, "a cat photo"), _pos(pipe, "a dog photo")
    assert s.positive.embeds.shape[0] == 2  # each distinct text encoded once
    # A1111's schedule is [1 cat, 2 dog, 3 cat, 4 dog] read with "step <= end".
    for step, want in enumerate([cat, cat, dog, cat, dog]):
        torch.testing.assert_close(s.at(step).prompt_embeds, want, rtol=0, atol=1e-6)


def test_schedule_entries_share_chunk_count_and_mean(pipes):
    pipe = pipes["sd1"]
    dogs = _words(80, "dog")
    weighted = _encode(pipe, f"[cat:{dogs}:0.5] (red:1.5)")
    plain = _encode(pipe, f"[cat:{dogs}:0.5] red")  # all weights 1: no rescaling at all
    rows_w, rows_p = weighted.positive.embeds, plain.positive.embeds
    # "cat red" needs one chunk, the dogs two: both entries get two (an empty chunk pads the first).
    assert rows_w.shape[:2] == (2, 2 * CHUNK)
    torch.testing.assert_close(rows_p[0, CHUNK:], _pos(pipe, "")[0], rtol=0, atol=1e-6)
    # A1111 encodes the entries as one batch, so the mean is restored over both rows together...
    for chunk in (slice(0, CHUNK), slice(CHUNK, None)):
        assert float(rows_w[:, chunk].mean()) == pytest.approx(float(rows_p[:, chunk].mean()), rel=1e-4)
    # ...not row by row.
    assert float(rows_w[0, :CHUNK].mean()) != pytest.approx(float(rows_p[0, :CHUNK].mean()), rel=1e-3)


# --- clip skip and pooled ------------------------------------------------------------------------


def test_clip_skip_sd1(pipes):
    pipe = pipes["sd1"]
    one, two = _pos(pipe, "a red cat", clip=1), _pos(pipe, "a red cat", clip=2)
    assert not torch.allclose(one, two)
    ids = pipe.tokenizer("a red cat", padding="max_length", max_length=CHUNK, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(two, pipe.text_encoder.final_layer_norm(hidden), rtol=0, atol=1e-6)


def test_clip_skip_sd2_and_sdxl_follow_a1111(pipes):
    # A1111 always reads SD2's penultimate OpenCLIP layer and SDXL's penultimate layers;
    # "Clip skip" changes SDXL only with its "Clip skip SDXL" option (CLIP-L, hidden_states[-N]).
    for family in ("sd2", "sdxl"):
        torch.testing.assert_close(_pos(pipes[family], "a red cat", clip=2), _pos(pipes[family], "a red cat", clip=1))
    xl = pipes["sdxl"]
    skip1 = _pos(xl, "a red cat", clip=1, sdxl_clip_l_skip=True)
    skip2 = _pos(xl, "a red cat", clip=2, sdxl_clip_l_skip=True)
    assert not torch.allclose(skip1, skip2)
    torch.testing.assert_close(skip2, _pos(xl, "a red cat"))
    width = xl.text_encoder.config.hidden_size
    torch.testing.assert_close(skip1[..., width:], skip2[..., width:])  # OpenCLIP-G untouched


def test_sdxl_pooled_comes_from_the_first_chunk(pipes):
    pipe = pipes["sdxl"]
    long_a = _encode(pipe, _words(75) + " BREAK a red dog").at(0)
    long_b = _encode(pipe, _words(75) + " BREAK a blue landscape").at(0)
    first_only = _encode(pipe, _words(75)).at(0)
    torch.testing.assert_close(long_a.pooled, first_only.pooled, rtol=0, atol=0)
    torch.testing.assert_close(long_b.pooled, first_only.pooled, rtol=0, atol=0)
    # Weights do not touch the pooled embeds (A1111 takes them before emphasis).
    torch.testing.assert_close(_encode(pipe, "(cat:1.4)").at(0).pooled, _encode(pipe, "cat").at(0).pooled)


def test_batch_repeat(pipes):
    e = _encode(pipes["sdxl"], "a cat", "dog").at(0).repeat(3)
    assert e.prompt_embeds.shape[0] == e.negative_prompt_embeds.shape[0] == e.pooled.shape[0] == 3
