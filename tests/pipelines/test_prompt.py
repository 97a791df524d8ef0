"""A1111 prompt syntax: attention, prompt editing, extra-network tags, AND, comments.

Expected values marked "A1111 doc" are the documented examples of A1111's
``modules/prompt_parser.py`` (docstrings of ``parse_prompt_attention`` and
``get_learned_conditioning_prompt_schedules``, and its header comment).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.errors import InvalidParameter
from pipelines.prompt import (
    HypernetSpec,
    LoraSpec,
    NetworkTag,
    extract_networks,
    has_and,
    hypernet_specs,
    lora_specs,
    parse_prompt_attention,
    prompt_schedules,
    split_and,
    strip_comments,
)

ROOT = Path(__file__).resolve().parents[2]


def test_importing_prompt_leaves_torch_out():
    code = "import sys, pipelines.prompt; print(sorted({'torch', 'diffusers', 'numpy', 'lark'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- attention ---------------------------------------------------------------

A1111_ATTENTION = [  # A1111 doc
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ["a ", 1.0],
            ["house", 1.5730000000000004],
            [" ", 1.1],
            ["on", 1.0],
            [" a ", 1.1],
            ["hill", 0.55],
            [", sun, ", 1.1],
            ["sky", 1.4641000000000006],
            [".", 1.1],
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_ATTENTION)
def test_attention_matches_a1111_examples(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [["", 1.0]]),
        ("()", [["", 1.0]]),
        ("[x]", [["x", 1 / 1.1]]),
        ("[[x]]", [["x", 1.0 * (1 / 1.1) * (1 / 1.1)]]),
        ("(x:1.5)", [["x", 1.5]]),
        ("(x: 1.5 )", [["x", 1.5]]),  # whitespace around the weight (A1111 >= 1.6)
        ("((x:1.5))", [["x", 1.5 * 1.1]]),
        ("(x:-1)", [["x", -1.0]]),
        ("a) b]", [["a) b]", 1.0]]),  # closers with nothing open are text
        ("a :1.5) b", [["a :1.5) b", 1.0]]),  # a weight with no '(' is text
        ("[unclosed", [["unclosed", 1 / 1.1]]),
        ("a \\\\ b", [["a \\ b", 1.0]]),  # \\ is one backslash
        ("a\\b", [["ab", 1.0]]),  # any other backslash is dropped
        ("(a:1e2)", [["a:1e2", 1.1]]),  # not a weight A1111 reads: text, and ')' is x1.1
        ("(a:.)", [["a:.", 1.1]]),  # A1111 crashes here; ours: text, ')' is x1.1
        ("(a:1.2.3) b", [["a:1.2.3", 1.1], [" b", 1.0]]),
    ],
)
def test_attention_edge_cases(text, expected):
    assert parse_prompt_attention(text) == expected


def test_break_splits_and_is_scaled_inside_brackets_like_a1111():
    assert parse_prompt_attention("a BREAK b") == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]
    assert parse_prompt_attention("a,BREAK,b") == [["a,", 1.0], ["BREAK", -1], [",b", 1.0]]
    assert parse_prompt_attention("BREAK") == [["", 1.0], ["BREAK", -1], ["", 1.0]]
    # Not a whole upper-case word: plain text.
    assert parse_prompt_attention("BREAKFAST break") == [["BREAKFAST break", 1.0]]
    # A1111 multiplies the BREAK marker too; its encoder then no longer sees a break.
    assert parse_prompt_attention("(a BREAK b)") == [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]
    # Two BREAKs keep an empty run between them.
    assert parse_prompt_attention("a BREAK BREAK b") == [
        ["a", 1.0], ["BREAK", -1], ["", 1.0], ["BREAK", -1], ["b", 1.0]
    ]


# --- prompt editing and alternation -------------------------------------------

ALT_A_B = [(1, "a"), (2, "(b:1.1)"), (3, "a"), (4, "(b:1.1)"), (5, "a"), (6, "(b:1.1)"),
           (7, "a"), (8, "(b:1.1)"), (9, "a"), (10, "(b:1.1)")]
A1111_SCHEDULES = [  # A1111 doc, 10 steps
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", ALT_A_B),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_SCHEDULES)
def test_schedules_match_a1111_examples(prompt, expected):
    assert prompt_schedules(prompt, 10) == expected


def test_schedule_of_a1111_header_example():  # A1111 doc, 100 steps
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedules(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_hires_pass_schedule_continues_the_timeline():  # A1111 doc (base 10, hires 10)
    assert prompt_schedules("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert prompt_schedules("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedules("a [b:15] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    # Old scheduling: the hires pass gets the first pass's schedule.
    assert prompt_schedules("a [b:.5] c", 10, hires_steps=20, old_scheduling=True) == [(5, "a  c"), (10, "a b c")]


def test_a1111_docstring_example_it_no_longer_meets():
    # A1111's docstring lists [(5, 'a  c'), (10, 'a {b|d{ c')] ("not handling this right
    # now"), but since '|' left plain text its own grammar rejects this prompt and the
    # literal text is used: we do what A1111 does, not what its docstring says.
    assert prompt_schedules("a [{b|d{:.5] c", 10) == [(10, "a [{b|d{:.5] c")]


@pytest.mark.parametrize(
    ("prompt", "steps", "expected"),
    [
        ("[fe|male]", 5, [(1, "fe"), (2, "male"), (3, "fe"), (4, "male"), (5, "fe")]),
        ("[a|b|c]", 5, [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]),
        ("[a:b:0.25]", 10, [(2, "a"), (10, "b")]),  # 2.5 truncates to 2
        ("[a:b:0.99]", 3, [(2, "a"), (3, "b")]),
        ("[a:b:1.0]", 10, [(10, "a")]),  # '.': a fraction, 1.0 = the end
        ("[a:b:1]", 10, [(1, "a"), (10, "b")]),  # no '.': a step
        ("[a:b:25]", 10, [(10, "a")]),  # capped at the step count
        ("[a:b:0]", 10, [(10, "b")]),
        ("[a:b:-3]", 10, [(10, "b")]),
        ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),
        ("[a:b:1e999]", 4, [(4, "a")]),  # A1111 crashes; ours: never switches
        ("[a:b: 3 ]", 10, [(3, "a"), (10, "b")]),
        ("[a:b:3x]", 10, [(10, "[a:b:3x]")]),  # not a number: literal brackets
        ("[a::5] [:b:5]", 10, [(5, "a "), (10, " b")]),
        ("[[a|b]:c:2]", 4, [(1, "a"), (2, "b"), (3, "c"), (4, "c")]),
        ("([a:b:2])", 3, [(2, "(a)"), (3, "(b)")]),
        ("\\[a:b:2\\]", 3, [(3, "\\[a:b:2\\]")]),  # escaped brackets are text
    ],
)
def test_schedule_cases(prompt, steps, expected):
    assert prompt_schedules(prompt, steps) == expected


def test_old_scheduling_reads_values_below_one_as_fractions():
    assert prompt_schedules("[a:b:1.0]", 10, old_scheduling=True) == [(1, "a"), (10, "b")]
    assert prompt_schedules("[a:b:0.5]", 10, old_scheduling=True) == [(5, "a"), (10, "b")]


@pytest.mark.parametrize("prompt", ["a | b", "[a|b", "(a|b)", "a\\", "a\\\nb", "[a|b:3]", "(" * 300 + "x"])
def test_unparseable_prompts_stay_literal(prompt):
    assert prompt_schedules(prompt, 7) == [(7, prompt)]


def test_very_deep_nesting_stays_literal_without_recursion_error():
    prompt = "[" * 500 + "a:b:2" + "]" * 500
    assert prompt_schedules(prompt, 3) == [(3, prompt)]


# --- extra networks ---------------------------------------------------------------


def test_extract_networks_removes_tags_in_order_everywhere():
    prompt = "a <lora:one:0.5> (cat <hypernet:h:0.3>:1.2) [<lyco:two>::5] <lora:three:1:0.2>"
    cleaned, tags = extract_networks(prompt)
    assert cleaned == "a  (cat :1.2) [::5] "
    assert tags == [
        NetworkTag("lora", "one", ("0.5",)),
        NetworkTag("hypernet", "h", ("0.3",)),
        NetworkTag("lyco", "two", ()),
        NetworkTag("lora", "three", ("1", "0.2")),
    ]
    assert str(tags[3]) == "<lora:three:1:0.2>"


def test_extract_networks_leaves_non_tags_alone():
    assert extract_networks("a <b> <:x> <foo:> c") == ("a <b> <:x> <foo:> c", [])
    # A1111's pattern needs a non-empty body; an empty tag of a kind we support is kept
    # as a (malformed) tag so it can be refused instead of reaching the text encoder.
    assert extract_networks("a <lora:>") == ("a ", [NetworkTag("lora", "", ())])


def _loras(prompt):
    return lora_specs(extract_networks(prompt)[1])


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("<lora:x>", LoraSpec("x", 1.0, 1.0)),
        ("<lora:x:0.7>", LoraSpec("x", 0.7, 0.7)),
        ("<lora:x:0.7:0.2>", LoraSpec("x", 0.7, 0.2)),
        ("<lora:x:-1.5>", LoraSpec("x", -1.5, -1.5)),
        ("<lyco:x:0.3>", LoraSpec("x", 0.3, 0.3)),
        ("<lora:x:unet=0.4>", LoraSpec("x", 1.0, 0.4)),
        ("<lora:x:te=0.2>", LoraSpec("x", 0.2, 0.2)),  # unet follows te
        ("<lora:x:0.8:te=0.2>", LoraSpec("x", 0.2, 0.2)),  # named overrides positional
        ("<lora:x:unet=0.1:te=0.6>", LoraSpec("x", 0.6, 0.1)),
        ("<lora:my lora v2:0.5>", LoraSpec("my lora v2", 0.5, 0.5)),
    ],
)
def test_lora_specs(prompt, expected):
    assert _loras(prompt) == [expected]


def test_several_loras_and_hypernets_in_prompt_order():
    _, tags = extract_networks("<lora:a:0.5> <hypernet:h> <lora:b> <hypernet:g:-0.5>")
    assert lora_specs(tags) == [LoraSpec("a", 0.5, 0.5), LoraSpec("b", 1.0, 1.0)]
    assert hypernet_specs(tags) == [HypernetSpec("h", 1.0), HypernetSpec("g", -0.5)]


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ("<lora:>", ["<lora:>", "no lora name"]),
        ("<lora::1>", ["<lora::1>", "no lora name"]),
        ("<lora:x:abc>", ["<lora:x:abc>", "'abc'", "not a number"]),
        ("<lora:x:nan>", ["<lora:x:nan>", "not a number"]),
        ("<lora:x:1:unet=q>", ["<lora:x:1:unet=q>", "'q'"]),
        ("<lora:x:1:1:1:1>", ["<lora:x:1:1:1:1>", "too many arguments"]),
        ("<lora:x:1:1:4>", ["dyn", "not supported"]),
        ("<lora:x:dyn=4>", ["dyn", "not supported"]),
        ("<lora:x:foo=1>", ["unknown argument 'foo'"]),
        ("<foo:bar>", ["<foo:bar>", "unknown extra network 'foo'", "lora, lyco, hypernet"]),
    ],
)
def test_malformed_lora_tags_are_refused_naming_the_tag(prompt, words):
    with pytest.raises(InvalidParameter) as info:
        lora_specs(extract_networks("a cat " + prompt)[1], field="negative_prompt")
    assert info.value.field == "negative_prompt"
    for word in words:
        assert word in info.value.message


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ("<hypernet:>", ["<hypernet:>", "no hypernet name"]),
        ("<hypernet:h:x>", ["<hypernet:h:x>", "'x'", "not a number"]),
        ("<hypernet:h:1:2>", ["<hypernet:h:1:2>", "too many arguments"]),
        ("<hypernet:h> <LORA:x>", ["unknown extra network 'LORA'"]),
    ],
)
def test_malformed_hypernet_tags_are_refused_naming_the_tag(prompt, words):
    with pytest.raises(InvalidParameter) as info:
        hypernet_specs(extract_networks(prompt)[1])
    assert info.value.field == "prompt"
    for word in words:
        assert word in info.value.message


# --- AND and comments ---------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
        ("a cat:1.2 AND a dog :0.5  AND x: -1", [("a cat", 1.2), (" a dog", 0.5), (" x", -1.0)]),
        ("photo:1.5", [("photo", 1.5)]),  # A1111 reads the weight even without AND
        ("a: 1:2", [("a: 1", 2.0)]),
        ("a:1.5.", [("a:1.5.", 1.0)]),
        ("(x:1.2)", [("(x:1.2)", 1.0)]),
        ("cat,AND,dog", [("cat,", 1.0), (",dog", 1.0)]),  # a whole word, not ' AND '
        ("ANDROID and AND", [("ANDROID and", 1.0), ("", 1.0)]),
    ],
)
def test_split_and_like_a1111(prompt, expected):
    assert split_and(prompt) == expected


def test_has_and():
    assert has_and("a AND b") and has_and("a,AND") and has_and("AND")
    assert not has_and("ANDROID and band") and not has_and("")


def test_strip_comments_like_a1111():
    assert strip_comments("cat # a comment") == "cat \n"
    assert strip_comments("# whole line\ncat\n#x\ndog") == "\ncat\ndog"
    assert strip_comments("no comment") == "no comment"


# --- properties -------------------------------------------------------------------

SPECIAL = st.sampled_from(list("()[]:|\\<>") + ["BREAK", " AND ", ".5", "3", " ", "\n", "<lora:x:1>"])
PROMPTS = st.lists(st.one_of(st.text(max_size=4), SPECIAL), max_size=25).map("".join)


@settings(max_examples=300)
@given(PROMPTS)
def test_parsing_never_raises(text):
    parse_prompt_attention(text)
    extract_networks(text)
    split_and(text)
    has_and(text)
    strip_comments(text)


@settings(max_examples=300)
@given(st.lists(st.sampled_from(["a", "b c", " ", ",", "(", ")", "[", "]"]), max_size=30).map("".join))
def test_words_and_brackets_always_get_positive_weights(text):
    runs = parse_prompt_attention(text)
    assert runs and all(weight > 0 for _, weight in runs)
    # Words survive in order; only brackets may go (stray closers stay as text).
    drop = str.maketrans("", "", "()[]")
    assert "".join(part for part, _ in runs).translate(drop) == text.translate(drop)


@settings(max_examples=300)
@given(PROMPTS, st.integers(min_value=1, max_value=150), st.none() | st.integers(min_value=1, max_value=60))
def test_schedules_cover_every_step(prompt, steps, hires_steps):
    schedule = prompt_schedules(prompt, steps, hires_steps=hires_steps)
    total = hires_steps or steps
    ends = [end for end, _ in schedule]
    assert ends[-1] == total
    assert all(1 <= a < b for a, b in itertools.pairwise(ends))
    assert all(isinstance(text, str) for _, text in schedule)


@given(st.text(alphabet=st.characters(exclude_characters="()[]:|\\"), max_size=40), st.integers(1, 50))
def test_prompts_without_syntax_have_one_entry(prompt, steps):
    assert prompt_schedules(prompt, steps) == [(steps, prompt)]
