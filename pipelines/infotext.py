"""A1111 "infotext": the generation-parameters text A1111 shows under an image and stores in its PNG.

Format (AUTOMATIC1111 WebUI 1.10, ``processing.create_infotext``)::

    <prompt>
    Negative prompt: <negative prompt>          (line left out when the negative prompt is empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1, Size: 512x512, …

* parameters are joined with ", "; a parameter whose value is ``None`` is left
  out, and one whose value equals its key is written as the bare key;
* a value containing ``,``, ``:`` or a newline is written as a JSON string
  (``ensure_ascii=False``); anything else is written with ``str()``;
* the whole text is ``.strip()``-ed.

A1111 1.10 no longer writes "Batch size" / "Batch pos" (older versions did);
:func:`a1111_params` follows 1.10, and callers may add any other key.

PNG: A1111 stores the text under the ``parameters`` key with Pillow's
``PngInfo.add_text`` (tEXt, or iTXt when the text is not Latin-1) and saves
with Pillow's default compression (zlib level 6), which we keep.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping

from PIL import Image, PngImagePlugin

PNG_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"

# The grammar of the parameters line: a key starts with a word character and goes on with word
# characters, spaces, "-" or "/"; a value is a JSON string (with escapes) or runs to the next comma.
_KEY = r"\w[\w /-]+"
_VALUE = r'"(?:\\.|[^"\\])+"|[^,]*'
_PARAM = re.compile(rf"\s*(?P<key>{_KEY}):\s*(?P<value>{_VALUE})(?:,|$)")
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(value: object) -> str:
    """Render one infotext value as A1111 does: JSON-quoted only if it holds ``,``, ``:`` or a newline."""
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        try:
            return json.dumps(value, ensure_ascii=False)
        except TypeError:  # not JSON-serialisable: quote its text
            return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    """Undo :func:`quote` for a value that is a JSON string; leave anything else as it is."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def build_infotext(prompt: str, negative_prompt: str | None, params: Mapping[str, object]) -> str:
    """A1111 infotext from the prompts and the ordered generation parameters (``None`` values dropped)."""
    items = [key if key == value else f"{key}: {quote(value)}" for key, value in params.items() if value is not None]
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(items)}".strip()


def a1111_params(
    *,
    steps: int,
    sampler: str,
    schedule: str | None,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_hash: str | None = None,
    model: str | None = None,
    vae_hash: str | None = None,
    vae: str | None = None,
    variation_seed: int | None = None,
    variation_seed_strength: float = 0.0,
    denoising_strength: float | None = None,
    clip_skip: int = 1,
    extra: Mapping[str, object] | None = None,
    version: str | None = None,
) -> dict[str, object]:
    """The generation parameters in A1111 1.10's order, with its omission rules applied.

    ``cfg_scale`` and the strengths are written as floats ("7.0"), as A1111's API
    does after pydantic coerces them; "Clip skip" only when above 1; the
    variation seed only when its strength is not 0. ``extra`` (LoRA hashes,
    hires fix, …) goes where A1111 puts ``extra_generation_params``, before "Version".
    """
    params: dict[str, object] = {
        "Steps": int(steps),
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": float(cfg_scale),
        "Seed": int(seed),
        "Size": f"{int(width)}x{int(height)}",
        "Model hash": model_hash,
        "Model": model,
        "VAE hash": vae_hash,
        "VAE": vae,
        "Variation seed": None if not variation_seed_strength else variation_seed,
        "Variation seed strength": None if not variation_seed_strength else float(variation_seed_strength),
        "Denoising strength": None if denoising_strength is None else float(denoising_strength),
        "Clip skip": None if clip_skip <= 1 else int(clip_skip),
    }
    params.update(extra or {})
    params["Version"] = version
    return params


def parse_infotext(text: str) -> dict[str, str]:
    """Parse infotext the way A1111's PNG Info does.

    Returns ``{"Prompt", "Negative prompt", <key>: <value>, …}`` with values as
    strings (JSON-quoted ones unquoted) and every ``WxH`` value split into
    ``<key>-1`` / ``<key>-2`` (``Size`` → ``Size-1``, ``Size-2``). The last line
    counts as parameters only if it holds at least 3 of them; otherwise it is
    part of the prompt. A1111's UI defaults for missing keys are not added.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative, line = True, line[len(NEGATIVE_PREFIX):].strip()
        # A1111 joins with "\n" only once the text is non-empty, so leading blank lines vanish.
        if in_negative:
            negative = f"{negative}\n{line}" if negative else line
        else:
            prompt = f"{prompt}\n{line}" if prompt else line
    result = {"Prompt": prompt, "Negative prompt": negative}
    for match in _PARAM.finditer(last):
        key, value = match.group("key"), match.group("value")
        if value[:1] == '"' and value[-1:] == '"':
            value = unquote(value)
        size = _SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result


def png_with_infotext(image: Image.Image, infotext: str, *, compress_level: int = 6) -> bytes:
    """Encode ``image`` as PNG with ``infotext`` in a ``parameters`` text chunk, as A1111 saves it.

    Only that chunk is written (none of ``image.info``), so the same pixels and
    text always give the same bytes. ``compress_level`` 6 is Pillow's default,
    which A1111 uses; 1 is ~2–3× faster to encode for a somewhat larger file.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, infotext)  # tEXt when Latin-1, else iTXt (UTF-8), like A1111
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def read_infotext(png: bytes) -> str | None:
    """The ``parameters`` text of a PNG, or ``None`` when it has none."""
    with Image.open(io.BytesIO(png)) as image:
        value = image.info.get(PNG_KEY)
    return value if isinstance(value, str) else None
