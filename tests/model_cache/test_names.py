"""A1111 model names: hash suffixes, sub-folders, and every way out of the store refused."""

import pytest

from model_cache import names
from pipelines.errors import InvalidParameter


@pytest.mark.parametrize(
    "given, expected",
    [
        ("v1-5-pruned-emaonly.safetensors [6ce0161689]", ("v1-5-pruned-emaonly.safetensors", "6ce0161689")),
        ("model [ABCDEF12]", ("model", "abcdef12")),  # legacy 8-char hash, upper case
        ("sub/dir/model.ckpt [0123456789]", ("sub/dir/model.ckpt", "0123456789")),
        ("model.safetensors", ("model.safetensors", None)),
        ("  spaced name  ", ("spaced name", None)),
        ("sub/name", ("sub/name", None)),
        ("100%_real", ("100%_real", None)),  # a bare '%' is a legal file name character
        ("model [not-a-hash]", ("model [not-a-hash]", None)),
        ("name.v2", ("name.v2", None)),
    ],
)
def test_clean_name_accepts(given, expected):
    assert names.clean_name(given) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        " [0123456789]",  # only a hash
        "..",
        "../x",
        "a/../../x",
        "a/..",
        "./x",
        "a/./x",
        "a//b",
        "a/",
        "/etc/passwd",
        "/abs/model.safetensors",
        "a\\b",
        "..\\..\\x",
        "C:model",
        "c:/models/x",
        "D:\\x",
        "s3://bucket/x",
        "file:///etc/passwd",
        "http://host/x",
        "%2e%2e/x",
        "..%2fx",
        "a%2Fb",
        "%2E%2E%2Fetc",
        "a%5cb",
        "%252e%252e%252f",
        "a\x00b",
        "a\nb",
        "a\tb",
        "a\x7fb",
        "a\u202eb",  # right-to-left override
        "lora:name",
        "x" * 1025,
        ("a" * 256) + ".pt",
        "a/ b",
        "\uff0e\uff0e/x",  # fullwidth ".." folds to ".."
        "a\uff0fb",  # fullwidth solidus folds to "/"
        "a\uff3cb",  # fullwidth reverse solidus folds to "\\"
    ],
)
def test_clean_name_rejects(bad):
    with pytest.raises(InvalidParameter) as info:
        names.clean_name(bad, field="payload.override_settings.sd_model_checkpoint")
    assert info.value.field == "payload.override_settings.sd_model_checkpoint"


def test_clean_name_rejects_non_string():
    with pytest.raises(InvalidParameter):
        names.clean_name(None)  # type: ignore[arg-type]


def test_candidates_with_and_without_extension():
    assert names.candidates("Stable-diffusion", "x") == ["x.safetensors", "x.ckpt"]
    assert names.candidates("Stable-diffusion", "x.ckpt") == ["x.ckpt"]
    assert names.candidates("Stable-diffusion", "x.CKPT") == ["x.CKPT"]
    assert names.candidates("embeddings", "bad-hands") == ["bad-hands.safetensors", "bad-hands.pt", "bad-hands.bin"]
    # A dot in the stem is not an extension.
    assert names.candidates("Lora", "style.v2") == ["style.v2.safetensors", "style.v2.pt", "style.v2.ckpt"]
    assert names.candidates("ControlNet", "sub/cn.pth") == ["sub/cn.pth"]


def test_unknown_kind():
    with pytest.raises(InvalidParameter) as info:
        names.candidates("Checkpoints", "x")
    assert "Stable-diffusion" in info.value.message
    with pytest.raises(InvalidParameter):
        names.check_kind("../Lora")


def test_every_kind_has_extensions():
    assert set(names.EXTENSIONS) == set(names.MODEL_KINDS)
    assert names.stem("sub/a.b.safetensors") == "a.b"
