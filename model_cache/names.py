"""A1111 model names: parse them, and refuse anything that could leave the store.

Users name models the way AUTOMATIC1111 shows them: ``sub/name.safetensors``,
``name`` (no extension), or a checkpoint title with its short hash,
``"v1-5-pruned-emaonly.safetensors [6ce0161689]"``. Those names end up joined to
a local folder or an S3 prefix, and the S3 ones again to the local disk cache,
so a name is a path-traversal vector twice over. Everything here is pure string
work that runs BEFORE any I/O: a rejected name never reaches ``stat`` or S3.
"""

from __future__ import annotations

import re
import unicodedata

from pipelines.errors import InvalidParameter

#: The A1111 models folder layout; each kind is one sub-folder of the store.
MODEL_KINDS = ("Stable-diffusion", "Lora", "hypernetworks", "embeddings", "VAE", "ControlNet", "annotators")

#: File extensions A1111 (and its ControlNet extension) pick up per kind, in lookup order:
#: safetensors first because it is the format that cannot execute code when loaded.
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "Stable-diffusion": (".safetensors", ".ckpt"),
    "Lora": (".safetensors", ".pt", ".ckpt"),
    "hypernetworks": (".pt", ".safetensors"),
    "embeddings": (".safetensors", ".pt", ".bin"),
    "VAE": (".safetensors", ".pt", ".ckpt"),
    "ControlNet": (".safetensors", ".pth", ".pt", ".ckpt", ".bin"),
    "annotators": (".pth", ".pt", ".bin", ".safetensors", ".ckpt"),
}

# A1111 titles end in " [hash]": 10 hex chars (new sha256-based) or 8 (legacy); accept up
# to a full sha256 so a pasted long hash also works.
_HASH_SUFFIX = re.compile(r"^(?P<name>.*?)\s+\[(?P<hash>[0-9a-fA-F]{8,64})\]$", re.DOTALL)
# Any percent-escape: "%2f", "%2e", "%5c", and double-encodings like "%252f" (which contain "%25").
# A name with an escape is never a real A1111 file name, and a decoder somewhere could undo it.
_PERCENT_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")
_DRIVE = re.compile(r"^[A-Za-z]:")

MAX_NAME_LENGTH = 1024  # the S3 key limit; a local path would fail earlier anyway
MAX_SEGMENT_BYTES = 255  # NAME_MAX on Linux filesystems (the disk cache mirrors keys)


def check_kind(kind: str, *, field: str = "kind") -> str:
    """Return ``kind`` if it is one of :data:`MODEL_KINDS`, else raise InvalidParameter."""
    if kind not in MODEL_KINDS:
        raise InvalidParameter(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}", field=field)
    return kind


def split_hash(name: str) -> tuple[str, str | None]:
    """Split A1111's ``"name [0123abcdef]"`` title into ``("name", "0123abcdef")``; no suffix → ``(name, None)``."""
    match = _HASH_SUFFIX.match(name)
    if match is None:
        return name, None
    return match.group("name"), match.group("hash").lower()


def clean_name(name: str, *, field: str = "name") -> tuple[str, str | None]:
    """Validate a user-given model name; return ``(relative_name_without_hash, hash_or_None)``.

    Allows sub-folders (``sub/name``). Rejects with :class:`InvalidParameter` (naming
    ``field``) every name that could resolve outside the store: empty names, absolute
    paths, ``..`` / ``.`` segments, backslashes, drive letters, URLs (``://``), any
    percent-escape, and control/format characters (NUL, bidi overrides…).
    """
    if not isinstance(name, str):
        raise InvalidParameter(f"model name must be a string, got {type(name).__name__}", field=field)
    # Control characters first: they would also make the error messages below unreadable.
    for char in name:
        if unicodedata.category(char) in ("Cc", "Cf"):
            raise InvalidParameter(f"model name {name!r} contains a control character (U+{ord(char):04X})", field=field)
    stripped, short_hash = split_hash(name.rstrip())
    stripped = stripped.strip()
    if not stripped:
        raise InvalidParameter("model name is empty", field=field)
    if len(stripped) > MAX_NAME_LENGTH:
        raise InvalidParameter(f"model name is longer than {MAX_NAME_LENGTH} characters", field=field)
    if "\\" in stripped:
        raise InvalidParameter(f"model name {stripped!r} contains a backslash; use '/' for sub-folders", field=field)
    if "://" in stripped:
        raise InvalidParameter(f"model name {stripped!r} looks like a URL; give a name relative to the store", field=field)
    if _DRIVE.match(stripped):
        raise InvalidParameter(f"model name {stripped!r} starts with a drive letter; give a relative name", field=field)
    if ":" in stripped:
        # Also keeps names usable inside A1111 prompt syntax (<lora:name:weight>).
        raise InvalidParameter(f"model name {stripped!r} contains ':'", field=field)
    if _PERCENT_ESCAPE.search(stripped):
        raise InvalidParameter(f"model name {stripped!r} contains a percent-encoded character", field=field)
    if stripped.startswith("/"):
        raise InvalidParameter(f"model name {stripped!r} is an absolute path; give a name relative to the store", field=field)
    # Look-alikes (fullwidth "／", "＼", "．．", division slash…) become real separators under
    # Unicode compatibility folding, which some filesystems and tools apply: refuse them too.
    folded = unicodedata.normalize("NFKC", stripped)
    if folded.count("/") != stripped.count("/") or "\\" in folded or any(seg in (".", "..") for seg in folded.split("/")):
        raise InvalidParameter(f"model name {stripped!r} contains a look-alike path separator or dot segment", field=field)
    for segment in stripped.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidParameter(
                f"model name {stripped!r} has an empty, '.' or '..' path segment", field=field
            )
        if segment != segment.strip():
            raise InvalidParameter(f"model name {stripped!r} has a path segment with surrounding spaces", field=field)
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise InvalidParameter(f"model name {stripped!r} has a path segment longer than 255 bytes", field=field)
    return stripped, short_hash


def has_extension(kind: str, name: str) -> bool:
    """True when ``name`` ends with one of ``kind``'s extensions (case-insensitive, as on A1111's Windows roots)."""
    lowered = name.lower()
    return any(lowered.endswith(ext) for ext in EXTENSIONS[check_kind(kind)])


def candidates(kind: str, name: str) -> list[str]:
    """File names to try for an already-cleaned ``name``, most likely first.

    ``"x.safetensors"`` → ``["x.safetensors"]``; ``"x"`` → ``["x.safetensors", "x.ckpt"]`` for
    checkpoints. Only a known extension counts as one, because stems may contain dots
    (``"model.v2"`` → ``["model.v2.safetensors", "model.v2.ckpt"]``).
    """
    if has_extension(kind, name):
        return [name]
    return [name + ext for ext in EXTENSIONS[check_kind(kind)]]


def stem(name: str) -> str:
    """Basename without its extension: how A1111 names LoRAs, hypernetworks and embeddings."""
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base
