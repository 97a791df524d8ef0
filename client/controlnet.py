"""``--controlnet FILE``: sd-webui-controlnet API units read from JSON files.

Each file holds one unit as the ControlNet extension's API takes it (``enabled``,
``module``, ``model``, ``weight``, ``image``, ``resize_mode``, ``processor_res``,
``threshold_a``, ``threshold_b``, ``guidance_start``, ``guidance_end``,
``pixel_perfect``, ``control_mode``, ``save_detected_map``, …); the units go to
``alwayson_scripts.controlnet.args`` in file order. A unit's ``image`` (and
``mask``) may name a local file — relative to the unit file's folder, then to the
current folder — which sdctl reads and base64-encodes, or be base64 already.
What can be checked without the server is checked here, naming the file and field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from client.config import EXIT_USAGE, CliError
from client.img2img import looks_like_b64_image, read_image_b64

MAX_UNITS = 10
_IMAGE_FIELDS = ("image", "input_image", "mask", "mask_image")
_NUMBERS = ("weight", "threshold_a", "threshold_b", "guidance_start", "guidance_end")
_BOOLS = ("enabled", "pixel_perfect", "save_detected_map", "lowvram")
# sd-webui-controlnet's enum fields: index or name
_CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")


def _image_value(value: Any, where: str, folder: Path) -> str:
    """A unit image: a file path (read, base64) or base64 kept as is."""
    if not isinstance(value, str) or not value.strip():
        raise CliError(f"{where}: expected a file path or a base64 image", EXIT_USAGE)
    text = value.strip()
    if not text.startswith("data:") and len(text) < 4096:
        for candidate in (folder / text, Path(text)):
            candidate = candidate.expanduser()
            if candidate.is_file():
                return read_image_b64(candidate, where)
    if looks_like_b64_image(text):
        return text
    raise CliError(f"{where}: {text[:80]!r} is neither an image file (looked in {folder} and the current folder) "
                   "nor a base64 image", EXIT_USAGE)


def _enum(value: Any, names: tuple[str, ...], where: str) -> None:
    if isinstance(value, bool) or not (
        (isinstance(value, int) and 0 <= value < len(names)) or (isinstance(value, str) and value in names)
    ):
        raise CliError(f"{where}: expected 0-{len(names) - 1} or one of {', '.join(repr(n) for n in names)}", EXIT_USAGE)


def load_unit(path: Path | str) -> dict[str, Any]:
    """One unit from ``path``, validated, its images inlined as base64."""
    path = Path(path).expanduser()
    try:
        unit = json.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(f"--controlnet {path}: no such file", EXIT_USAGE) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"--controlnet {path}: cannot read it ({exc})", EXIT_USAGE) from None
    except json.JSONDecodeError as exc:
        raise CliError(f"--controlnet {path}: not valid JSON ({exc})", EXIT_USAGE) from None
    if not isinstance(unit, dict):
        raise CliError(f"--controlnet {path}: expected one JSON object (a ControlNet unit), got {type(unit).__name__}", EXIT_USAGE)
    where = f"--controlnet {path}"
    for name in _NUMBERS:
        if name in unit and (isinstance(unit[name], bool) or not isinstance(unit[name], (int, float))):
            raise CliError(f"{where}: {name} must be a number, got {unit[name]!r}", EXIT_USAGE)
    for name in _BOOLS:
        if name in unit and not isinstance(unit[name], bool):
            raise CliError(f"{where}: {name} must be true or false, got {unit[name]!r}", EXIT_USAGE)
    for name in ("module", "model"):
        if name in unit and not isinstance(unit[name], str):
            raise CliError(f"{where}: {name} must be a string, got {unit[name]!r}", EXIT_USAGE)
    if "processor_res" in unit and (isinstance(unit["processor_res"], bool) or not isinstance(unit["processor_res"], int)):
        raise CliError(f"{where}: processor_res must be an integer, got {unit['processor_res']!r}", EXIT_USAGE)
    start, end = unit.get("guidance_start", 0.0), unit.get("guidance_end", 1.0)
    if not (0.0 <= start <= end <= 1.0):
        raise CliError(f"{where}: need 0 <= guidance_start ({start}) <= guidance_end ({end}) <= 1", EXIT_USAGE)
    if "control_mode" in unit:
        _enum(unit["control_mode"], _CONTROL_MODES, f"{where}: control_mode")
    if "resize_mode" in unit:
        _enum(unit["resize_mode"], _RESIZE_MODES, f"{where}: resize_mode")
    out = dict(unit)
    for name in _IMAGE_FIELDS:
        value = unit.get(name)
        if value is None:
            continue
        if isinstance(value, dict):  # the extension also takes {"image": ..., "mask": ...}
            out[name] = {k: _image_value(v, f"{where}: {name}.{k}", path.parent) if v is not None else None
                         for k, v in value.items()}
        else:
            out[name] = _image_value(value, f"{where}: {name}", path.parent)
    return out


def load_units(paths: list[Path | str] | None) -> list[dict[str, Any]]:
    """Units from ``--controlnet`` files in order; at most :data:`MAX_UNITS`."""
    paths = list(paths or [])
    if len(paths) > MAX_UNITS:
        raise CliError(f"--controlnet given {len(paths)} times: at most {MAX_UNITS} units", EXIT_USAGE)
    return [load_unit(p) for p in paths]


def attach(payload: dict[str, Any], units: list[dict[str, Any]]) -> dict[str, Any]:
    """``payload`` with ``units`` as ``alwayson_scripts.controlnet.args`` (other scripts kept)."""
    if not units:
        return payload
    scripts = dict(payload.get("alwayson_scripts") or {})
    scripts["controlnet"] = {"args": units}
    return {**payload, "alwayson_scripts": scripts}
