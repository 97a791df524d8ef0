"""Textual-inversion embeddings, used A1111's way: by file stem in the prompt or negative prompt.

Formats read (safely: pickles only with ``weights_only=True``), in A1111's order:

* A1111 ``.pt``: ``{"string_to_param": {"*": tensor[n, d]}, "name", "step", …}``;
* SDXL files: ``{"clip_l": tensor[n, 768], "clip_g": tensor[n, 1280]}``
  (``clip_l`` goes to ``text_encoder``/``tokenizer``, ``clip_g`` to the ``_2`` pair);
* one-tensor dicts: A1111 ``.safetensors`` (``{"emb_params": …}``) and diffusers
  ``{token: tensor}`` (``.bin``/``.safetensors``); a bare tensor is accepted too.

A1111's image-embedded embeddings (``.png``/``.webp``) are refused with a clear error.

Which embeddings a prompt uses (:func:`find_embedding_names`): A1111 compares
CLIP token ids, so a name matches case-insensitively and only as whole words.
Our rule, shared with the tokenizer: the stem matches where it is neither
preceded nor followed by a word character (letter, digit, ``_``), ignoring case;
``myemb`` matches in ``a photo of myemb, (myemb:1.2)`` and ``[myemb:other:5]``
but not in ``myembx``, ``xmyemb`` or ``myemb_2``; where several stems could match
at one place the longest wins (A1111 tries longer embeddings first); text inside
extra-network tags (``<lora:myemb:1>``) is ignored, since A1111 strips those tags.
(A1111 would also match ``myemb`` in ``myemb2``, because CLIP splits digits off
words; we keep the simpler word rule.)  To make the tokenizer agree, every token
we add is registered ``single_word=True``: once loaded, an embedding still cannot
leak into ``myembx``, whatever earlier requests loaded.

Tokens are the lower-cased file stem (CLIP lower-cases prompts, and diffusers'
multi-vector expansion in ``maybe_convert_prompt`` compares the tokenizer's
lower-cased pieces with the registered token).  A multi-vector embedding adds
``stem``, ``stem_1``, … ``stem_{n-1}``; diffusers' pipelines expand ``stem`` into
all of them (``pipe.maybe_convert_prompt``), case-sensitively, so run prompts
through :meth:`EmbeddingManager.canonical_prompt` first.

No unloading: a loaded token only matters where a prompt names it, an embedding
is a few KB, and the model cache drops the whole pipeline (tokens included) when
it evicts a checkpoint.  The one exception is a file whose contents changed
(same stem, new sha256): its old vectors are replaced.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from pipelines.errors import ModelNotFound, ModelRejected

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt")
SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
SHORTHASH_LEN = 12  # A1111's Embedding.shorthash: sha256[:12]
_EXTRA_NETWORK_TAG = re.compile(r"<\w+:[^>]+>")  # A1111's <name:args> syntax, stripped before conditioning


class EmbeddingSpec(NamedTuple):
    """An embedding the server resolved: local file, its sha256, the name users write (the file stem)."""

    path: str | os.PathLike
    sha256: str
    token: str


@dataclass(frozen=True)
class LoadedEmbedding:
    """What one loaded file added: the user-facing name, the registered token, how many vectors, per encoder part."""

    name: str
    token: str
    sha256: str
    vectors: int
    parts: tuple[str, ...]

    @property
    def tokens(self) -> list[str]:
        """Every token the tokenizer(s) got: ``token``, ``token_1``, …"""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.vectors)]


def _read_file(path: Path):
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise ModelRejected(f"{path.name}: corrupt safetensors file ({exc})") from exc
    from pipelines.checkpoint import safe_torch_load

    return safe_torch_load(path, "embedding")


def _as_vectors(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ModelRejected(f"{name}: embedding data is a {type(value).__name__}, not a tensor")
    value = value.detach().to(torch.float32)
    if value.ndim == 1:
        value = value.unsqueeze(0)
    if value.ndim != 2 or value.shape[0] == 0:
        raise ModelRejected(f"{name}: embedding tensor has shape {tuple(value.shape)}, expected [vectors, width]")
    return value


def read_embedding(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The vectors of an embedding file: ``{"": [n, d]}``, or ``{"clip_l": …, "clip_g": …}`` for SDXL files."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"{path.name}: no such embedding file ({path})")
    if path.suffix.lower() not in SUFFIXES:
        raise ModelRejected(f"{path.name}: unsupported embedding file type (expected {', '.join(SUFFIXES)})")
    data = _read_file(path)
    if isinstance(data, torch.Tensor):
        return {"": _as_vectors(data, path.name)}
    if not isinstance(data, dict):
        raise ModelRejected(f"{path.name}: holds a {type(data).__name__}, not an embedding")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelRejected(f"{path.name}: string_to_param must hold exactly one tensor")
        return {"": _as_vectors(next(iter(params.values())), path.name)}
    if "clip_l" in data and "clip_g" in data:
        return {"clip_l": _as_vectors(data["clip_l"], path.name), "clip_g": _as_vectors(data["clip_g"], path.name)}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:
        return {"": _as_vectors(next(iter(tensors.values())), path.name)}
    raise ModelRejected(f"{path.name}: not a textual inversion embedding (keys: {sorted(map(str, data))[:6]})")


def _stem_pattern(stems: Iterable[str]) -> re.Pattern | None:
    stems = sorted({s for s in stems if s}, key=len, reverse=True)  # longest first, as A1111
    if not stems:
        return None
    return re.compile(r"(?<!\w)(" + "|".join(re.escape(s) for s in stems) + r")(?!\w)", re.IGNORECASE)


def _outside_tags(prompt: str) -> list[tuple[bool, str]]:
    """Split ``prompt`` into (is_plain_text, piece); extra-network tags are the non-plain pieces."""
    pieces, last = [], 0
    for tag in _EXTRA_NETWORK_TAG.finditer(prompt):
        pieces += [(True, prompt[last:tag.start()]), (False, tag.group(0))]
        last = tag.end()
    return pieces + [(True, prompt[last:])]


def find_embedding_names(prompt: str, available_stems: Iterable[str]) -> list[str]:
    """Stems from ``available_stems`` that ``prompt`` uses, in order of first use (rules in the module docstring)."""
    available = list(available_stems)
    pattern = _stem_pattern(available)
    if pattern is None or not prompt:
        return []
    by_lower: dict[str, str] = {}
    for stem in available:
        by_lower.setdefault(stem.lower(), stem)
    found: list[str] = []
    for plain, piece in _outside_tags(prompt):
        if plain:
            for match in pattern.finditer(piece):
                stem = by_lower[match.group(1).lower()]
                if stem not in found:
                    found.append(stem)
    return found


def ti_hashes(used: Iterable[tuple[str, str]]) -> str | None:
    """A1111's ``TI hashes`` value: ``"name: sha256[:12], …"``, names without ``:`` and ``,``; None if empty."""
    items: list[str] = []
    for name, sha256 in used:
        if not sha256:
            continue
        item = f"{name.replace(':', '').replace(',', '')}: {sha256[:SHORTHASH_LEN]}"
        if item not in items:
            items.append(item)
    return ", ".join(items) or None


def infotext_params(used: Iterable[tuple[str, str]]) -> dict[str, object]:
    """``{"TI hashes": …}`` for the embeddings used by the prompt and negative prompt, or ``{}``."""
    value = ti_hashes(used)
    return {"TI hashes": value} if value else {}


class EmbeddingManager:
    """Loads embeddings into one pipeline's tokenizer(s) and text encoder(s), each file once.

    ``family`` is "sd1", "sd2" or "sdxl".  Not thread-safe: one job at a time.
    """

    def __init__(self, pipe, family: str):
        self.pipe = pipe
        self.family = family
        self.loaded: dict[str, LoadedEmbedding] = {}  # by token

    def _encoders(self) -> dict[str, tuple[object, object]]:
        if self.family == "sdxl":
            return {"clip_l": (self.pipe.tokenizer, self.pipe.text_encoder),
                    "clip_g": (self.pipe.tokenizer_2, self.pipe.text_encoder_2)}
        return {"": (self.pipe.tokenizer, self.pipe.text_encoder)}

    @staticmethod
    def _width(text_encoder) -> int:
        return int(text_encoder.get_input_embeddings().weight.shape[-1])

    def _check(self, name: str, vectors: dict[str, torch.Tensor]) -> None:
        encoders = self._encoders()
        want = {part: self._width(te) for part, (_, te) in encoders.items()}
        have = {part: int(v.shape[-1]) for part, v in vectors.items()}
        if set(have) != set(want):
            if self.family == "sdxl":
                raise ModelRejected(
                    f"{name}: a {have.get('', '?')}-wide SD1/SD2 embedding; this SDXL model needs an SDXL embedding "
                    f"(clip_l {want['clip_l']} and clip_g {want['clip_g']} wide)")
            raise ModelRejected(
                f"{name}: an SDXL embedding (clip_l {have.get('clip_l')}, clip_g {have.get('clip_g')} wide); "
                f"this {self.family} model's text encoder is {want['']} wide")
        for part, width in have.items():
            if width != want[part]:
                label = f"{part} part is" if part else "embedding is"
                raise ModelRejected(f"{name}: {label} {width} wide, but this {self.family} model's "
                                    f"{part or 'text'} encoder is {want[part]} wide")

    def _unload(self, emb: LoadedEmbedding) -> None:
        for part, (tokenizer, text_encoder) in self._encoders().items():
            if part in emb.parts:
                self.pipe.unload_textual_inversion(emb.tokens, tokenizer=tokenizer, text_encoder=text_encoder)
        del self.loaded[emb.token]

    def _register(self, spec: EmbeddingSpec, token: str, vectors: dict[str, torch.Tensor]) -> LoadedEmbedding:
        from tokenizers import AddedToken

        name = Path(spec.path).name
        encoders = self._encoders()
        for part in vectors:
            vocab = encoders[part][0].get_vocab()
            if token in vocab or f"{token}_1" in vocab:
                raise ModelRejected(f"{name}: the name {token!r} is already a token of the model's "
                                    f"vocabulary; rename the file")
        for part, vec in vectors.items():
            tokenizer, text_encoder = encoders[part]
            try:
                self.pipe.load_textual_inversion(vec, token=token, tokenizer=tokenizer, text_encoder=text_encoder)
            except ValueError as exc:
                raise ModelRejected(f"{name}: {exc}") from exc
            added = [token] + [f"{token}_{i}" for i in range(1, vec.shape[0])]
            size = len(tokenizer)
            # Whole-word matching only (see the module docstring); re-adding an existing token updates its flags.
            tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=True, special=False) for t in added])
            if len(tokenizer) != size:
                raise RuntimeError(f"re-registering the tokens of {name} grew the vocabulary")
        emb = LoadedEmbedding(spec.token, token, spec.sha256, max(int(v.shape[0]) for v in vectors.values()),
                              tuple(vectors))
        log.info("loaded embedding %s (%d vector(s))", name, emb.vectors)
        return emb

    def ensure(self, specs: Iterable[EmbeddingSpec | tuple]) -> list[LoadedEmbedding]:
        """Make sure every embedding in ``specs`` is loaded; returns their :class:`LoadedEmbedding` in order.

        Already loaded tokens with the same sha256 are skipped.  A wrong-width
        embedding raises ModelRejected naming the file and both widths, before
        anything is changed.  A token whose file changed (new sha256) is replaced.
        """
        out = []
        for spec in (EmbeddingSpec(*s) for s in specs):
            token = spec.token.lower()
            current = self.loaded.get(token)
            if current is not None and current.sha256 == spec.sha256:
                out.append(current)
                continue
            vectors = read_embedding(spec.path)
            self._check(Path(spec.path).name, vectors)
            if current is not None:
                log.info("embedding %s changed (sha256 %s -> %s); replacing it",
                         spec.token, current.sha256[:12], spec.sha256[:12])
                self._unload(current)
            self.loaded[token] = self._register(spec, token, vectors)
            out.append(self.loaded[token])
        return out

    def canonical_prompt(self, prompt: str) -> str:
        """``prompt`` with every use of a loaded embedding written as its registered token (lower case).

        Only case changes: the tokenizer reads both alike, but diffusers'
        multi-vector expansion needs the exact token.  Extra-network tags are left as they are.
        """
        pattern = _stem_pattern(e.token for e in self.loaded.values())
        if pattern is None or not prompt:
            return prompt
        return "".join(
            pattern.sub(lambda m: m.group(1).lower(), piece) if plain else piece
            for plain, piece in _outside_tags(prompt)
        )
