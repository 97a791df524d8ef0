"""Derive the CLIP BPE tokenizer files bundled in ``container/configs/``.

Every Stable Diffusion text encoder (SD1.x CLIP ViT-L/14, SD2.x OpenCLIP ViT-H,
SDXL CLIP-L + OpenCLIP ViT-bigG) uses the same byte-level BPE that OpenAI
published with CLIP as ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence). The
families differ only in their small ``tokenizer_config.json`` /
``special_tokens_map.json`` (pad token), which live in the tokenizer folders.

This script turns that gz into the two files ``transformers.CLIPTokenizer``
reads, and writes them once into ``container/configs/_clip_bpe/``:

* ``vocab.json``  - 49,408 entries: the 256 byte symbols, the same 256 with the
  end-of-word marker ``</w>``, one entry per merge (48,894), then
  ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
* ``merges.txt`` - a ``#version: 0.2`` header and the 48,894 merges.

Each ``configs/<family>/tokenizer*/`` folder then holds relative symlinks to
those two files, so the ~2 MB of data exists once in the repository. The
script (re)creates those links too; it is idempotent.

The gz ships inside PyPI's ``open_clip_torch`` wheel, so no model hub is
needed::

    pip download --no-deps open_clip_torch -d /tmp/oc
    python container/build_tokenizers.py /tmp/oc/open_clip_torch-*.whl

The argument may also be the extracted ``bpe_simple_vocab_16e6.txt.gz``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps a 49,408-entry vocabulary: 2 * 256 byte symbols, 2 special
# tokens, and as many merges as fit in the rest (the gz lists far more).
VOCAB_SIZE = 49408
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
NUM_MERGES = VOCAB_SIZE - 2 * 256 - len(SPECIAL_TOKENS)  # 48,894
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
SHARED_DIR_NAME = "_clip_bpe"
SHARED_FILES = ("vocab.json", "merges.txt")


def read_bpe_gz(source: Path) -> bytes:
    """Return the gzip bytes of the CLIP BPE file from a wheel/zip or a bare gz."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            members = [n for n in archive.namelist() if n.endswith("/" + BPE_NAME) or n == BPE_NAME]
            if len(members) != 1:
                raise FileNotFoundError(f"{source}: expected one {BPE_NAME} inside, found {members}")
            return archive.read(members[0])
    return source.read_bytes()


def parse_merges(gz_bytes: bytes) -> list[tuple[str, str]]:
    """The first ``NUM_MERGES`` merge rules, as pairs, in rank order.

    Line 0 of the file is a header (its text varies between copies), so it is
    skipped rather than checked.
    """
    lines = gzip.decompress(gz_bytes).decode("utf-8").split("\n")
    rules = lines[1 : 1 + NUM_MERGES]
    merges = []
    for number, line in enumerate(rules, start=2):
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"line {number} of {BPE_NAME} is not a merge rule: {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{BPE_NAME} holds {len(merges)} merges, expected {NUM_MERGES}")
    return merges


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, in CLIP/GPT-2 vocabulary order.

    Bytes that are already visible characters ('!'..'~', '¡'..'¬', '®'..'ÿ')
    stand for themselves and come first; every other byte (controls, space,
    soft hyphen...) is mapped, in byte order, to code points from U+0100 up so
    the BPE never sees whitespace or control characters.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in set(visible)]
    return [chr(b) for b in visible] + [chr(256 + i) for i in range(len(hidden))]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, with ids assigned in CLIP's order (see module docstring)."""
    symbols = byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + list(SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def write_shared_files(merges: list[tuple[str, str]], out_dir: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (UTF-8, LF, stable bytes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(merges)
    (out_dir / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8"
    )
    merges_text = "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n"
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")


def link_tokenizer_folders(configs_dir: Path, shared_dir: Path) -> list[Path]:
    """Point every ``<family>/tokenizer*/`` folder at the shared files.

    Links are relative (``../../_clip_bpe/vocab.json``) so they survive a
    clone or a ``COPY`` into the image at any path.
    """
    linked = []
    for folder in sorted(configs_dir.glob("*/tokenizer*")):
        if not folder.is_dir() or folder.parent == shared_dir:
            continue
        for name in SHARED_FILES:
            link = folder / name
            target = Path(os.path.relpath(shared_dir / name, folder))
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            if link.exists() or link.is_symlink():
                link.unlink()
            link.symlink_to(target)
            linked.append(link)
    return linked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help=f"open_clip_torch wheel, or {BPE_NAME}")
    parser.add_argument("--configs", type=Path, default=CONFIGS_DIR, help="bundled configs folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    gz_bytes = read_bpe_gz(args.source)
    logger.info("%s sha256 %s", BPE_NAME, hashlib.sha256(gz_bytes).hexdigest())
    merges = parse_merges(gz_bytes)
    shared_dir = args.configs / SHARED_DIR_NAME
    write_shared_files(merges, shared_dir)
    for name in SHARED_FILES:
        data = (shared_dir / name).read_bytes()
        logger.info("wrote %s (%d bytes, sha256 %s)", shared_dir / name, len(data), hashlib.sha256(data).hexdigest())
    for link in link_tokenizer_folders(args.configs, shared_dir):
        logger.info("linked %s -> %s", link, os.readlink(link))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
