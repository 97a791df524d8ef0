"""Prompt editing and alternation: A1111's ``[from:to:when]`` and ``[a|b]``.

A1111 parses these with a lark grammar; we hand-write a recursive-descent
parser with the same language so the HTTP process stays free of extra
dependencies (and of torch). The language, stated as facts about A1111:

* top level: a mix of *prompt items* and stray ``( ) [ ] :`` characters, which
  are kept verbatim; a ``|`` outside an alternation, a backslash at the very
  end, or a backslash before a newline make the whole prompt unparseable;
* plain text: any character but ``\\ [ ] ( ) : |``, or a backslash followed by
  any character except a newline (kept with its backslash: escapes are
  resolved later, by attention parsing);
* ``(p)`` and ``(p:q)`` and ``[p]``: emphasis, kept verbatim here;
* ``[to:N]``, ``[from:to:N]``: prompt editing; ``N`` is a signed number
  (lark's ``SIGNED_NUMBER``), optionally surrounded by whitespace;
* ``[a|b|...]``: alternation; options after the first may be empty.

Inside a bracket everything must parse, so any bracket position has at most
one reading; only at top level may a bracket also be a stray character. We
take the structured reading whenever it exists (as the grammar's documented
examples do). A prompt that does not parse keeps its literal text for every
step, as in A1111.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["prompt_schedules"]

# A1111 imports lark's SIGNED_NUMBER: ASCII digits, optional sign, decimal
# point and exponent. ``[0-9]`` on purpose: Python's ``\d`` accepts any
# Unicode digit, lark's grammar does not.
_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*\]")
_PLAIN = re.compile(r"[^\\\[\]():|]+")
_STRAY = "()[]:"

# Recursion guard: deeper nesting than this is treated as unparseable (the
# prompt stays literal) instead of overflowing Python's stack.
_MAX_DEPTH = 100


@dataclass(frozen=True)
class _Scheduled:
    before: tuple | None  # None for the ``[to:when]`` form
    after: tuple
    when: str  # the number's source text: '.' in it decides fraction vs step


@dataclass(frozen=True)
class _Alternate:
    options: tuple


class _Unparseable(Exception):
    """The prompt is outside the grammar: A1111 falls back to the literal text."""


class _Parser:
    """One-shot parser for one prompt; nodes are ``str`` | ``_Scheduled`` | ``_Alternate``."""

    def __init__(self, text: str):
        self.text = text
        self.memo: dict[int, tuple[object, int] | None] = {}

    def parse(self) -> list:
        text, i, nodes = self.text, 0, []
        while i < len(text):
            char = text[i]
            if char in "([":
                parsed = self._bracket(i, 0)
                if parsed is not None:
                    nodes.append(parsed[0])
                    i = parsed[1]
                    continue
                nodes.append(char)  # no structured reading: a stray character
                i += 1
            elif char in _STRAY:
                nodes.append(char)
                i += 1
            else:
                items, i = self._items(i, 0)
                if i < len(text) and text[i] not in _STRAY:
                    raise _Unparseable  # '|' or a bad backslash at top level
                nodes.extend(items)
        return nodes

    def _items(self, i: int, depth: int) -> tuple[list, int]:
        """Prompt items from ``i`` up to the first character they cannot consume."""
        text, items = self.text, []
        while i < len(text):
            char = text[i]
            if char == "\\":
                if i + 1 >= len(text) or text[i + 1] == "\n":
                    break
                items.append(text[i : i + 2])
                i += 2
            elif char in "([":
                parsed = self._bracket(i, depth + 1)
                if parsed is None:
                    break
                items.append(parsed[0])
                i = parsed[1]
            elif char in ":|)]":
                break
            else:
                run = _PLAIN.match(text, i)
                items.append(run.group())
                i = run.end()
        return items, i

    def _bracket(self, i: int, depth: int) -> tuple[object, int] | None:
        """The structure opening at ``i`` and the index after it, or None if there is none.

        Memoised because a failed top-level attempt is retried from each inner bracket.
        """
        if i not in self.memo:
            if depth > _MAX_DEPTH:
                raise _Unparseable
            self.memo[i] = self._round(i, depth) if self.text[i] == "(" else self._square(i, depth)
        return self.memo[i]

    def _round(self, i: int, depth: int):
        text = self.text
        inner, j = self._items(i + 1, depth)
        if j < len(text) and text[j] == ")":
            return ("(", *inner, ")"), j + 1
        if j < len(text) and text[j] == ":":
            second, k = self._items(j + 1, depth)
            if k < len(text) and text[k] == ")":
                return ("(", *inner, ":", *second, ")"), k + 1
        return None

    def _square(self, i: int, depth: int):
        text = self.text
        first, j = self._items(i + 1, depth)
        if j >= len(text):
            return None
        if text[j] == "]":
            return ("[", *first, "]"), j + 1
        if text[j] == "|":
            options = [tuple(first)]
            while j < len(text) and text[j] == "|":
                option, j = self._items(j + 1, depth)
                options.append(tuple(option))
            if j < len(text) and text[j] == "]":
                return _Alternate(tuple(options)), j + 1
            return None
        if text[j] == ":":
            when = _WHEN.match(text, j + 1)
            if when:  # [to:when]
                return _Scheduled(None, tuple(first), when.group(1)), when.end()
            second, k = self._items(j + 1, depth)
            if k < len(text) and text[k] == ":":
                when = _WHEN.match(text, k + 1)
                if when:  # [from:to:when]
                    return _Scheduled(tuple(first), tuple(second), when.group(1)), when.end()
        return None


def _walk(nodes):
    """Every node, nested ones included (also those in branches never shown)."""
    for node in nodes:
        if isinstance(node, tuple):
            yield from _walk(node)
        else:
            yield node
            if isinstance(node, _Scheduled):
                yield from _walk((node.before or (), node.after))
            elif isinstance(node, _Alternate):
                yield from _walk(node.options)


def _render(nodes, step: int, whens: dict) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, tuple):
            parts.append(_render(node, step, whens))
        elif isinstance(node, _Scheduled):
            chosen = (node.before or ()) if step <= whens[id(node)] else node.after
            parts.append(_render(chosen, step, whens))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, whens))
    return "".join(parts)


def _when_step(source: str, steps: int, base_steps: int, hires: bool, old: bool) -> int:
    """A1111's rounding: truncate toward zero, cap at ``steps``.

    Current A1111 decides by spelling: a number with '.' is a fraction of the
    pass (``1.0`` = the end), one without is a step count. The old rule (A1111
    < 1.6, its "use old scheduling" option) reads any value below 1 as a
    fraction. In a hires pass, fractions count from 1.0 and steps from the
    base pass's step count, so ``[a:b:1.5]`` switches halfway through hires.
    """
    value = float(source)
    if old:
        value = value * steps if value < 1 else value
    elif "." in source:
        value = (value - (1.0 if hires else 0.0)) * steps
    else:
        value = value - (base_steps if hires else 0)
    if not math.isfinite(value):  # A1111 crashes on 1e999; never switching matches its intent
        return steps if value > 0 else 0
    return min(steps, int(value))


def prompt_schedules(
    prompt: str, steps: int, *, hires_steps: int | None = None, old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """The texts one prompt takes over sampling: ``[(end_step, text), ...]``.

    Mirrors A1111's ``get_learned_conditioning_prompt_schedules`` for a single
    prompt: each pair's text is used for steps up to and including
    ``end_step`` (1-based); the last pair ends at the pass's step count.
    ``hires_steps`` computes the schedule of a hires-fix second pass (whose
    timeline continues after the ``steps`` of the first pass), unless
    ``old_scheduling`` asks for A1111's pre-1.6 rules, under which the hires
    pass gets the first pass's schedule unchanged.
    A prompt outside the grammar gives ``[(steps, prompt)]``.

    >>> prompt_schedules("a [b:3]", 10)
    [(3, 'a '), (10, 'a b')]
    """
    # A1111 quirk kept on purpose: with old scheduling a hires pass reuses the
    # first pass's schedule (its step count included).
    hires = hires_steps is not None and not old_scheduling
    total = hires_steps if hires else steps
    try:
        tree = tuple(_Parser(prompt).parse())
    except _Unparseable:
        return [(total, prompt)]
    ends, whens = {total}, {}
    for node in _walk(tree):
        if isinstance(node, _Scheduled):
            whens[id(node)] = _when_step(node.when, total, steps, hires, old_scheduling)
            if whens[id(node)] >= 1:
                ends.add(whens[id(node)])
        elif isinstance(node, _Alternate):
            ends.update(range(1, total + 1))
    return [(end, _render(tree, end, whens)) for end in sorted(ends)]
