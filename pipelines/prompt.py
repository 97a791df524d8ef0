"""A1111 prompt syntax, in pure Python.

Pure on purpose: the HTTP process validates prompts with this module and must
never import torch (a test proves it). A1111 reads a prompt in this order, and
callers should do the same:

1. :func:`strip_comments` — ``# ...`` to the end of a line is dropped
   (A1111 >= 1.8, its "Enable comments" option, on by default);
2. :func:`extract_networks` — ``<lora:name:w>``-style tags leave the text;
3. :func:`split_and` — ``AND`` separates composable sub-prompts, each with an
   optional trailing ``:weight``;
4. :func:`prompt_schedules` — ``[from:to:when]`` and ``[a|b]`` give the text
   per sampling step;
5. :func:`parse_prompt_attention` — ``(x)``, ``[x]``, ``(x:1.5)`` and
   ``BREAK`` give weighted text runs for the text encoder.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipelines.errors import InvalidParameter
from pipelines.prompt_schedule import prompt_schedules

__all__ = [
    "SUPPORTED_NETWORKS",
    "HypernetSpec",
    "LoraSpec",
    "NetworkTag",
    "extract_networks",
    "has_and",
    "hypernet_specs",
    "lora_specs",
    "parse_prompt_attention",
    "prompt_schedules",
    "split_and",
    "strip_comments",
]

# ---------------------------------------------------------------------------
# Attention: (x) (x:1.5) [x] BREAK

# The token classes of A1111's attention tokenizer, in its priority order.
_ATTENTION_TOKEN = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\])           # \( \) \[ \] \\ : the literal character
    | (?P<lone>\\)                        # any other backslash: dropped
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)    # ':1.5)' closes a '(' with that weight
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+ | :)
    """,
    re.VERBOSE,
)
# BREAK only as a whole word; the whitespace around it goes with it.
_BREAK = re.compile(r"\bBREAK\b")
_ROUND = 1.1
_SQUARE = 1 / 1.1  # multiplied, not divided, so weights match A1111's floats


def parse_prompt_attention(text: str) -> list[list]:
    """Split ``text`` into ``[text, weight]`` runs, exactly as A1111 does.

    ``(x)`` multiplies by 1.1, ``[x]`` by 1/1.1, ``(x:w)`` by ``w``; nesting
    multiplies. A bracket left open applies to the rest of the prompt; a
    closing bracket with no opener is plain text. ``\\(`` ``\\)`` ``\\[``
    ``\\]`` ``\\\\`` are literal characters, and any other backslash is
    dropped. Neighbouring runs of equal weight merge. ``BREAK`` becomes
    ``["BREAK", -1]`` — and, like A1111, it is scaled by brackets around it
    (``(a BREAK b)`` gives ``-1.1``, which A1111's encoder no longer treats as
    a break). An empty result is ``[["", 1.0]]``.

    One deviation: where A1111 crashes on an unreadable weight such as
    ``(a:1.2.3)``, the ``:1.2.3`` is plain text and the ``)`` closes as ×1.1.

    >>> parse_prompt_attention("an (important) word")
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    """
    runs: list[list] = []
    round_opens: list[int] = []
    square_opens: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        # One multiplication per run per bracket, in closing order: the float
        # results depend on this order, and A1111's examples pin them.
        for run in runs[start:]:
            run[1] *= factor

    def add_text(chunk: str) -> None:
        # Same pieces as A1111's split on r"\s*\bBREAK\b\s*", without that
        # pattern's quadratic time on long runs of whitespace.
        start = 0
        for found in _BREAK.finditer(chunk):
            piece = chunk[start : found.start()].rstrip()
            runs.append([piece.lstrip() if start else piece, 1.0])
            runs.append(["BREAK", -1])
            start = found.end()
        runs.append([chunk[start:].lstrip() if start else chunk, 1.0])

    for token in _ATTENTION_TOKEN.finditer(text):
        kind = token.lastgroup
        if kind == "escaped":
            runs.append([token.group("escaped"), 1.0])
        elif kind == "lone":
            runs.append(["", 1.0])
        elif kind == "open":
            (round_opens if token.group() == "(" else square_opens).append(len(runs))
        elif kind == "weight" and round_opens:
            try:
                factor = float(token.group("weight"))
            except ValueError:  # '.', '1.2.3': see the docstring
                add_text(token.group()[:-1])
                scale_from(round_opens.pop(), _ROUND)
            else:
                scale_from(round_opens.pop(), factor)
        elif kind == "close" and token.group() == ")" and round_opens:
            scale_from(round_opens.pop(), _ROUND)
        elif kind == "close" and token.group() == "]" and square_opens:
            scale_from(square_opens.pop(), _SQUARE)
        else:  # text, or a closer with nothing to close
            add_text(token.group())

    for start in round_opens:
        scale_from(start, _ROUND)
    for start in square_opens:
        scale_from(start, _SQUARE)
    if not runs:
        return [["", 1.0]]

    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return merged


# ---------------------------------------------------------------------------
# Extra networks: <kind:arg1:arg2...>

SUPPORTED_NETWORKS = ("lora", "lyco", "hypernet")  # lyco: A1111's alias for lora
# A1111's tag pattern is ``<(\w+):([^>]+)>``, so ``<lora:>`` is plain text
# there. We also take an empty tag of a supported kind, so that it is reported
# as malformed instead of being sent to the text encoder unnoticed.
_TAG_KIND = re.compile(r"(\w+):")


@dataclass(frozen=True)
class NetworkTag:
    """One ``<kind:name:arg...>`` tag as written; arguments are unvalidated text."""

    kind: str
    name: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return "<" + ":".join((self.kind, self.name, *self.args)) + ">"


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to apply: text-encoder and UNet multipliers (any sign)."""

    name: str
    te_weight: float
    unet_weight: float


@dataclass(frozen=True)
class HypernetSpec:
    """A hypernetwork to apply with its strength."""

    name: str
    strength: float


def extract_networks(prompt: str) -> tuple[str, list[NetworkTag]]:
    """Remove every extra-network tag; return the cleaned prompt and the tags in order.

    Tags are removed wherever they are, including inside brackets and prompt
    editing (A1111 removes them before any other parsing, so a LoRA inside
    ``[<lora:x>::5]`` applies to every step). Arguments are split on ``:``.
    Never raises: validation happens in :func:`lora_specs` and
    :func:`hypernet_specs`.
    """
    # A hand scan for r"<(\w+):([^>]*)>" (the regex is quadratic on '<a:<a:...').
    tags: list[NetworkTag] = []
    kept: list[str] = []
    start = 0  # prompt[start:] is not yet copied to kept
    opening = prompt.find("<")
    closing = -1
    while opening >= 0:
        kind = _TAG_KIND.match(prompt, opening + 1)
        if kind and closing < kind.end():
            closing = prompt.find(">", kind.end())
            if closing < 0:
                break  # no '>' left: no more tags
        if kind is None or (closing == kind.end() and kind.group(1) not in SUPPORTED_NETWORKS):
            opening = prompt.find("<", opening + 1)  # not a tag (for A1111 either)
            continue
        name, *args = prompt[kind.end() : closing].split(":")
        tags.append(NetworkTag(kind.group(1), name, tuple(args)))
        kept.append(prompt[start:opening])
        start = closing + 1
        opening = prompt.find("<", start)
    kept.append(prompt[start:])
    return "".join(kept), tags


def _check_kinds(tags: list[NetworkTag], field: str) -> None:
    # A1111 logs and skips unknown kinds; we refuse, since the user asked for
    # something we would silently not do.
    for tag in tags:
        if tag.kind not in SUPPORTED_NETWORKS:
            raise InvalidParameter(
                f"{field}: unknown extra network '{tag.kind}' in '{tag}'; "
                f"supported: {', '.join(SUPPORTED_NETWORKS)}",
                field=field,
            )


def _name(tag: NetworkTag, field: str) -> str:
    if not tag.name.strip():
        raise InvalidParameter(f"{field}: '{tag}' has no {tag.kind} name", field=field)
    return tag.name


def _number(tag: NetworkTag, text: str, what: str, field: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidParameter(f"{field}: {what} '{text}' in '{tag}' is not a number", field=field)
    return value


_LORA_FORMS = "<lora:name>, <lora:name:weight> or <lora:name:te_weight:unet_weight> (te=, unet= also accepted)"


def lora_specs(tags: list[NetworkTag], field: str = "prompt") -> list[LoraSpec]:
    """LoRAs asked for by ``lora`` and ``lyco`` tags, in prompt order.

    As in A1111: ``<lora:n>`` is 1.0 for both parts, ``<lora:n:w>`` is ``w``
    for both, ``<lora:n:te:unet>`` sets them apart, and ``te=``/``unet=``
    arguments override positional ones (``<lora:n:0.5:unet=1>``). A1111's
    fourth argument (``dyn``, DyLoRA rank) is refused because we cannot honour
    it; so are other extra arguments, which A1111 would ignore. Raises
    :class:`InvalidParameter` naming ``field`` and the tag; unknown kinds
    among ``tags`` are refused too.
    """
    _check_kinds(tags, field)
    specs = []
    for tag in tags:
        if tag.kind not in ("lora", "lyco"):
            continue
        name = _name(tag, field)
        positional, named = [], {}
        for arg in tag.args:
            parts = arg.split("=")
            if len(parts) == 2:  # A1111: exactly one '=' makes a named argument
                named[parts[0]] = parts[1]
            else:
                positional.append(arg)
        unknown = sorted(set(named) - {"te", "unet"})
        if "dyn" in named or len(positional) == 3:
            raise InvalidParameter(f"{field}: '{tag}': the dyn (DyLoRA) argument is not supported", field=field)
        if unknown or len(positional) > 3:
            extra = f"unknown argument '{unknown[0]}'" if unknown else "too many arguments"
            raise InvalidParameter(f"{field}: '{tag}': {extra}; use {_LORA_FORMS}", field=field)
        te = _number(tag, positional[0], "weight", field) if positional else 1.0
        te = _number(tag, named["te"], "te weight", field) if "te" in named else te
        unet = _number(tag, positional[1], "unet weight", field) if len(positional) > 1 else te
        unet = _number(tag, named["unet"], "unet weight", field) if "unet" in named else unet
        specs.append(LoraSpec(name, te, unet))
    return specs


def hypernet_specs(tags: list[NetworkTag], field: str = "prompt") -> list[HypernetSpec]:
    """Hypernetworks asked for by ``<hypernet:name>`` (strength 1.0) or ``<hypernet:name:w>``.

    Raises :class:`InvalidParameter` naming ``field`` and the tag for an empty
    name, a strength that is not a number, or more arguments (A1111 ignores
    extras; we refuse them); unknown kinds among ``tags`` are refused too.
    """
    _check_kinds(tags, field)
    specs = []
    for tag in tags:
        if tag.kind != "hypernet":
            continue
        name = _name(tag, field)
        if len(tag.args) > 1:
            raise InvalidParameter(
                f"{field}: '{tag}': too many arguments; use <hypernet:name> or <hypernet:name:strength>", field=field
            )
        strength = _number(tag, tag.args[0], "strength", field) if tag.args else 1.0
        specs.append(HypernetSpec(name, strength))
    return specs


# ---------------------------------------------------------------------------
# AND (composable diffusion) and comments

_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")


def has_and(prompt: str) -> bool:
    """True if ``prompt`` uses ``AND`` (a whole, upper-case word) to compose sub-prompts."""
    return _AND.search(prompt) is not None


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Sub-prompts and their weights, as A1111's ``get_multicond_prompt_list`` reads them.

    The prompt splits at every whole word ``AND``; each part loses trailing
    whitespace and an optional trailing ``:weight`` (default 1.0), keeping
    leading whitespace. A1111 applies this to every prompt, so a prompt
    without ``AND`` that ends in ``:1.5`` is one sub-prompt of weight 1.5.

    >>> split_and("a cat AND a dog:0.5")
    [('a cat', 1.0), (' a dog', 0.5)]
    """
    parts = []
    for part in _AND.split(prompt):
        # A1111 matches r"^(.*?)(?:\s*:\s*(NUMBER))?\s*$" (quadratic on long
        # whitespace). Equivalently: the weight, if any, follows the last ':'.
        text = part.rstrip()
        colon = text.rfind(":")
        if colon >= 0 and _AND_WEIGHT.fullmatch(text[colon + 1 :].lstrip()):
            parts.append((text[:colon].rstrip(), float(text[colon + 1 :])))
        else:
            parts.append((text, 1.0))
    return parts


_COMMENT_LINE = re.compile(r"(^|\n)#[^\n]*(\n|$)")
_COMMENT_TAIL = re.compile(r"#[^\n]*(\n|$)")


def strip_comments(text: str) -> str:
    """Drop ``#`` comments as A1111's "Enable comments" option (default on) does.

    A whole-line comment and a comment at the end of a line each leave one
    newline in their place.
    """
    return _COMMENT_TAIL.sub("\n", _COMMENT_LINE.sub("\n", text))
