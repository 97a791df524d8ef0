"""Text conditioning the AUTOMATIC1111 way, built on a diffusers pipeline's own encoders.

diffusers truncates prompts at 77 tokens and treats ``(word:1.2)`` as text. The
WebUI (``sd_hijack_clip``) instead:

* splits the prompt into attention fragments and tokenizes each (no BOS/EOS),
  every token keeping its fragment's weight;
* fills chunks of 75 tokens: ``BREAK`` closes the current chunk; when a chunk is
  full and its last comma is at most 20 tokens back (``comma_padding_backtrack``)
  the tokens after that comma move to the next chunk; a multi-vector textual
  inversion embedding is never split across chunks;
* pads each chunk with EOS to 75, wraps it in BOS/EOS (77) and, for tokenizers
  whose pad token is not EOS (OpenCLIP), puts the pad token after the first EOS;
* encodes every chunk, multiplies token vectors by their weights and rescales so
  the tensor's mean is unchanged (``z *= w; z *= old_mean / new_mean``, the mean
  taken over the whole batch of prompts encoded together), then joins the chunks
  along the sequence axis;
* encodes all entries of a prompt-editing schedule in one batch, padding shorter
  ones with empty chunks so every entry has the same length.

Which hidden state each family reads (A1111 defaults):

* SD1: the last layer; with "Clip skip" N > 1 layer -N followed by the final layer norm.
* SD2: the penultimate layer of OpenCLIP + final norm, whatever the clip skip. A
  diffusers SD2 text encoder has the last layer removed already, so this is its
  ``last_hidden_state``.
* SDXL: penultimate hidden states of both encoders without final norm, joined on
  the feature axis; clip skip is ignored unless ``sdxl_clip_l_skip`` (A1111's
  "Clip skip SDXL" option) applies it to CLIP-L. Pooled embeds: text_encoder_2's
  projection of the first chunk, unweighted. An empty negative prompt gives
  zeros, as A1111 (and diffusers' ``force_zeros_for_empty_prompt``) do.

One deviation: when the prompt and negative prompt need different numbers of
chunks, A1111 (default settings) runs two UNet passes of different lengths; a
diffusers pipeline needs one shape, so the shorter side is padded with the
empty prompt's encoding, which is A1111's "Pad prompt/negative prompt" option.
A zero (empty SDXL) negative is padded with zeros, which is exact: attention
over all-zero keys and values gives the same output at any length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from pipelines.errors import InvalidParameter, ModelRejected
from pipelines.prompt import parse_prompt_attention, prompt_schedules

log = logging.getLogger(__name__)

CHUNK_TOKENS = 75  # prompt tokens per chunk; BOS and EOS make it 77
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"


@dataclass
class _Chunk:
    """75 token ids and their weights, before BOS/EOS wrapping."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Encoder:
    """One tokenizer + text encoder, and which of its outputs A1111 reads."""

    tokenizer: object
    model: torch.nn.Module
    read: Callable[[torch.nn.Module, object], torch.Tensor]
    pooled: bool = False  # also return the projected pooled output (SDXL's text_encoder_2)


@dataclass(frozen=True)
class Embeds:
    """Conditioning for one step: ``[1, 77*k, dim]`` tensors, pooled ``[1, dim2]`` for SDXL."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def repeat(self, n: int) -> Embeds:
        """The same conditioning for a batch of ``n`` images."""

        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat(n, *([1] * (t.dim() - 1)))

        return Embeds(*(rep(t) for t in (self.prompt_embeds, self.negative_prompt_embeds, self.pooled, self.negative_pooled)))


@dataclass(frozen=True)
class _Side:
    """Encoded schedule entries of one prompt: rows of embeddings, and which row ends at which step."""

    embeds: torch.Tensor  # [rows, 77*k, dim]
    pooled: torch.Tensor | None  # [rows, dim2]
    entries: tuple[tuple[int, int], ...]  # (end_step, row), in order
    zero: bool = False  # SDXL's empty negative prompt: all zeros

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // (CHUNK_TOKENS + 2)

    def row_at(self, step: int) -> int:
        # A1111 (reconstruct_cond_batch): the first entry whose end step is >= the
        # 0-based step; past the last one it falls back to the first entry.
        for end, row in self.entries:
            if step <= end:
                return row
        return self.entries[0][1]


@dataclass(frozen=True)
class ConditioningSchedule:
    """Prompt and negative prompt conditioning for every sampler step (0-based model call index)."""

    positive: _Side
    negative: _Side
    steps: int

    def at(self, step: int) -> Embeds:
        """The conditioning to use for the model call with 0-based index ``step``."""
        p, n = self.positive.row_at(step), self.negative.row_at(step)
        pick = lambda t, r: None if t is None else t[r : r + 1]
        return Embeds(
            pick(self.positive.embeds, p),
            pick(self.negative.embeds, n),
            pick(self.positive.pooled, p),
            pick(self.negative.pooled, n),
        )

    @cached_property
    def changes_at(self) -> frozenset[int]:
        """Steps whose conditioning differs from the previous step's."""

        def key(s: int) -> tuple[int, int]:
            return self.positive.row_at(s), self.negative.row_at(s)

        return frozenset(s for s in range(1, self.steps + 1) if key(s) != key(s - 1))

    @property
    def chunk_count(self) -> int:
        """Number of 77-token chunks in every step's embeddings."""
        return self.positive.chunks


def chunk_prompt(text: str, tokenizer, expand: Callable[[str], str] | None = None) -> list[_Chunk]:
    """Split one prompt (no schedule syntax left) into 75-token chunks as A1111's ``tokenize_line``.

    ``expand`` rewrites each attention fragment before tokenizing; pass diffusers'
    ``maybe_convert_prompt`` so a multi-vector embedding becomes its N tokens.
    """
    comma = tokenizer.get_vocab().get(",</w>")
    eos = tokenizer.eos_token_id
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if not t.special}
    chunks: list[_Chunk] = []
    cur = _Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal cur, last_comma
        fill = CHUNK_TOKENS - len(cur.tokens)
        cur.tokens += [eos] * fill
        cur.weights += [1.0] * fill
        chunks.append(cur)
        cur, last_comma = _Chunk(), -1

    for fragment, weight in parse_prompt_attention(text):
        if fragment == "BREAK" and weight == -1:
            close()
            continue
        if expand is not None:
            fragment = expand(fragment)
        ids = tokenizer(fragment, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        for group in _token_groups(ids, added):
            if len(group) > CHUNK_TOKENS:
                raise ModelRejected(f"embedding {added[group[0]]!r} has {len(group)} vectors; a prompt chunk holds {CHUNK_TOKENS}")
            if group[0] == comma:
                last_comma = len(cur.tokens)
            elif len(cur.tokens) == CHUNK_TOKENS and last_comma != -1 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK:
                # Full chunk with a comma near its end: carry the words after it over.
                cut = last_comma + 1
                moved = _Chunk(cur.tokens[cut:], cur.weights[cut:])
                del cur.tokens[cut:], cur.weights[cut:]
                close()
                cur = moved
            if len(cur.tokens) == CHUNK_TOKENS or len(cur.tokens) + len(group) > CHUNK_TOKENS:
                close()
            cur.tokens += group
            cur.weights += [weight] * len(group)
    if cur.tokens or not chunks:
        close()
    return chunks


def _token_groups(ids: list[int], added: dict[int, str]):
    """Yield single tokens, and each multi-vector embedding (``name name_1 name_2 …``) as one group."""
    i = 0
    while i < len(ids):
        n, name = 1, added.get(ids[i])
        if name is not None:
            while i + n < len(ids) and added.get(ids[i + n]) == f"{name}_{n}":
                n += 1
        yield ids[i : i + n]
        i += n


def _family(pipe) -> str:
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    # OpenCLIP (SD2) uses GELU, OpenAI CLIP (SD1) quick GELU.
    return "sd2" if getattr(pipe.text_encoder.config, "hidden_act", "") == "gelu" else "sd1"


def _hidden(out, layer: int) -> torch.Tensor:
    """``out.hidden_states[-layer]``; a layer past the embeddings is clamped to them (tiny models)."""
    states = out.hidden_states
    if layer > len(states):
        log.debug("clip skip %d exceeds the text encoder's %d layers; using the embeddings", layer, len(states) - 1)
    return states[-min(layer, len(states))]


def _encoders(pipe, family: str, clip_stop: int, sdxl_clip_l_skip: bool) -> list[_Encoder]:
    def final_norm(model) -> torch.nn.Module:
        # transformers 5's CLIPTextModel holds the norm itself; older ones under .text_model
        return getattr(model, "text_model", model).final_layer_norm

    if family == "sd1":
        if clip_stop > 1:
            return [_Encoder(pipe.tokenizer, pipe.text_encoder, lambda m, o: final_norm(m)(_hidden(o, clip_stop)))]
        return [_Encoder(pipe.tokenizer, pipe.text_encoder, lambda m, o: o.last_hidden_state)]
    if family == "sd2":
        return [_Encoder(pipe.tokenizer, pipe.text_encoder, lambda m, o: o.last_hidden_state)]
    clip_l_layer = clip_stop if sdxl_clip_l_skip else 2
    return [
        _Encoder(pipe.tokenizer, pipe.text_encoder, lambda m, o: _hidden(o, clip_l_layer)),
        _Encoder(pipe.tokenizer_2, pipe.text_encoder_2, lambda m, o: _hidden(o, 2), pooled=True),
    ]


def _input_ids(chunks: list[_Chunk], tokenizer) -> torch.Tensor:
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for chunk in chunks:
        row = [bos, *chunk.tokens, eos]
        first_eos = row.index(eos)
        rows.append(row[: first_eos + 1] + [pad if pad is not None else eos] * (len(row) - first_eos - 1))
    return torch.tensor(rows, dtype=torch.long)


def _encode_chunk_batch(enc: _Encoder, chunks: list[_Chunk], counts: list[int], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode one chunk index for every row; apply weights and A1111's mean restoration over the batch."""
    out = enc.model(_input_ids(chunks, enc.tokenizer).to(device), output_hidden_states=True)
    z = enc.read(enc.model, out)
    weights = torch.tensor([[1.0, *c.weights, 1.0] for c in chunks], device=z.device, dtype=torch.float32)
    n = torch.tensor(counts, device=z.device, dtype=torch.float32)

    def batch_mean(t: torch.Tensor) -> torch.Tensor:
        # A1111 encodes each schedule entry as often as it occurs: weight row means by that count.
        return (t.float().mean(dim=(1, 2)) * n).sum() / n.sum()

    if not torch.all(weights == 1.0):
        before = batch_mean(z)
        weighted = z.float() * weights[..., None]
        after = batch_mean(weighted)
        # A1111 divides unguarded; a zero mean (untrained layer norms) would give inf.
        z = (weighted * (before / after) if after != 0 else weighted).to(z.dtype)
    return z, (out.text_embeds if enc.pooled else None)


def _encode_texts(pipe, encoders: list[_Encoder], texts: list[str], counts: list[int], device):
    """Encode several prompts together: ``([rows, 77*k, dim], pooled [rows, dim2] | None)``."""
    expand = getattr(pipe, "maybe_convert_prompt", None)
    per_encoder = [
        [chunk_prompt(t, enc.tokenizer, (lambda s, tok=enc.tokenizer: expand(s, tok)) if expand else None) for t in texts]
        for enc in encoders
    ]
    k = max(len(c) for rows in per_encoder for c in rows)
    feats, pooled = [], None
    for enc, rows in zip(encoders, per_encoder):
        empty = chunk_prompt("", enc.tokenizer)[0]
        parts = []
        for ci in range(k):
            z, p = _encode_chunk_batch(enc, [r[ci] if ci < len(r) else empty for r in rows], counts, device)
            parts.append(z)
            if ci == 0 and p is not None:
                pooled = p
        feats.append(torch.cat(parts, dim=1))
    return torch.cat(feats, dim=-1), pooled


def _schedule_side(pipe, encoders, text: str, steps: int, device, *, zero_if_empty: bool) -> _Side:
    schedule = prompt_schedules(text, steps)
    texts = list(dict.fromkeys(t for _, t in schedule))
    counts = [sum(1 for _, t in schedule if t == u) for u in texts]
    entries = tuple((int(end), texts.index(t)) for end, t in schedule)
    embeds, pooled = _encode_texts(pipe, encoders, texts, counts, device)
    if zero_if_empty and all(t == "" for t in texts):
        # A1111 (force_zero_embeddings) and diffusers (force_zeros_for_empty_prompt) agree here.
        return _Side(torch.zeros_like(embeds[:1]), None if pooled is None else torch.zeros_like(pooled[:1]), ((steps, 0),), zero=True)
    return _Side(embeds, pooled, entries)


def _pad_side(side: _Side, chunks: int, empty: Callable[[], torch.Tensor]) -> _Side:
    """Append empty-prompt chunks (zeros for a zero side) until every row has ``chunks`` chunks."""
    missing = chunks - side.chunks
    if missing <= 0:
        return side
    pad = torch.zeros_like(side.embeds[:1, : CHUNK_TOKENS + 2]) if side.zero else empty()
    tail = pad.repeat(side.embeds.shape[0], missing, 1)
    return _Side(torch.cat([side.embeds, tail], dim=1), side.pooled, side.entries, side.zero)


@torch.no_grad()
def encode_prompts(
    pipe,
    prompt: str,
    negative_prompt: str,
    steps: int,
    clip_stop_at_last_layers: int = 1,
    *,
    sdxl_clip_l_skip: bool = False,
) -> ConditioningSchedule:
    """Encode ``prompt`` / ``negative_prompt`` with A1111 semantics for a run of ``steps`` model calls.

    Prompt editing and alternation (``[a:b:0.5]``, ``[a|b]``) are resolved with
    :func:`pipelines.prompt.prompt_schedules` over ``steps``; each distinct text is
    encoded once. ``clip_stop_at_last_layers`` is A1111's "Clip skip" (1 = last
    layer); see the module docstring for how each family reads it. Extra-network
    tags must already be stripped. Tensors are on the pipeline's execution device
    in the text encoder's dtype.
    """
    if steps < 1:
        raise InvalidParameter(f"steps must be at least 1, not {steps}", field="steps")
    family = _family(pipe)
    encoders = _encoders(pipe, family, max(1, int(clip_stop_at_last_layers)), sdxl_clip_l_skip)
    device = pipe._execution_device
    positive = _schedule_side(pipe, encoders, prompt, steps, device, zero_if_empty=False)
    negative = _schedule_side(pipe, encoders, negative_prompt, steps, device, zero_if_empty=family == "sdxl")
    chunks = max(positive.chunks, negative.chunks)
    cache: list[torch.Tensor] = []

    def empty() -> torch.Tensor:  # A1111 pads with the encoding of "" (cond_stage_model_empty_prompt)
        if not cache:
            cache.append(_encode_texts(pipe, encoders, [""], [1], device)[0])
        return cache[0]

    positive, negative = _pad_side(positive, chunks, empty), _pad_side(negative, chunks, empty)
    log.debug("conditioning: %d chunk(s), %d/%d schedule rows", chunks, positive.embeds.shape[0], negative.embeds.shape[0])
    return ConditioningSchedule(positive, negative, steps)
