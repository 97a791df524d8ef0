"""ControlNet units as sd-webui-controlnet's API takes them: parse, validate, record.

Pure Python + Pillow (no torch): the HTTP process parses
``alwayson_scripts.controlnet.args`` here, so a bad unit is a 422 naming
``alwayson_scripts.controlnet.args[i].<field>`` before the job is queued, and the
worker receives plain :class:`ControlUnit` objects (images as PNG bytes).

Fields, with the extension's defaults and meanings:

- ``enabled`` (True): disabled units are skipped, but keep their index (infotext "ControlNet <i>").
- ``module`` ("none"): the preprocessor (:mod:`pipelines.preprocess_names` spellings).
- ``model``: the ControlNet's A1111 name, e.g. ``control_v11p_sd15_canny [d14c016b]`` (hash optional).
- ``weight`` (1.0, 0–2): scale of the residuals.
- ``image``: base64, ``{"image": b64, "mask": b64}``, or ``[image, mask]``; legacy ``input_image``;
  ``mask``/``mask_image`` beside it.  Missing: img2img uses the init image, txt2img is a 422
  (the extension fails there too: "no input image").
- ``resize_mode`` ("Crop and Resize"): "Just Resize" / "Crop and Resize" / "Resize and Fill" or 0/1/2.
- ``processor_res``, ``threshold_a``, ``threshold_b`` (-1 = the preprocessor's default).
- ``guidance_start``/``guidance_end`` (0.0/1.0): the fraction of sampling steps the unit acts in
  (legacy ``guidance`` = ``guidance_end``).
- ``pixel_perfect`` (False): processor_res computed from the image and target size.
- ``control_mode`` ("Balanced"): or "My prompt is more important" / "ControlNet is more important", 0/1/2.
- ``save_detected_map`` (True): the preprocessed map is returned and stored with the images.
- ``low_vram``/``lowvram``: accepted, no effect here (warned).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from pipelines.errors import InvalidParameter
from pipelines.image_input import decode_image_b64, to_png_bytes
from pipelines.preprocess_names import (
    SPECS,
    normalize_module,
    resolve_processor_res,
    resolve_threshold,
)

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS = ("Both", "Low res only", "High res only")  # which hires-fix pass a unit acts in (no hires fix here yet)
# Older UI labels the extension still maps (external_code.resize_mode_aliases).
_RESIZE_ALIASES = {
    "inner fit (scale to fit)": "Crop and Resize",
    "scale to fit (inner fit)": "Crop and Resize",
    "outer fit (shrink to fit)": "Resize and Fill",
    "envelope (outer fit)": "Resize and Fill",
    "just resize (latent upscale)": "Just Resize",
}
_LEGACY = {"guidance": "guidance_end", "lowvram": "low_vram", "input_image": "image", "guessmode": "guess_mode", "mask_image": "mask"}
# Fields the extension's API has that change nothing for a plain ControlNet unit here.
_INERT = {"input_mode", "batch_images", "batch_image_dir", "batch_mask_dir", "output_dir", "loopback", "use_preview_as_input",
          "generated_image", "inpaint_crop_input_image", "pulid_mode", "union_control_type", "is_ui"}
_REFUSED = {"advanced_weighting": "advanced weighting", "effective_region_mask": "effective region masks", "ipadapter_input": "IP-Adapter inputs"}
_KNOWN = {"enabled", "module", "model", "weight", "image", "mask", "resize_mode", "low_vram", "processor_res", "threshold_a", "threshold_b",
          "guidance_start", "guidance_end", "pixel_perfect", "control_mode", "save_detected_map", "guess_mode", "hr_option"}


@dataclass
class ControlUnit:
    """One enabled unit, validated. ``image`` is PNG bytes, or None for "use the img2img init image"."""

    index: int
    module: str
    model: str
    weight: float = 1.0
    image: bytes | None = None
    resize_mode: str = "Crop and Resize"
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"
    save_detected_map: bool = True
    low_vram: bool = False
    hr_option: str = "Both"
    has_mask: bool = False

    def field(self, name: str) -> str:
        return unit_field(self.index, name)

    @property
    def mode_index(self) -> int:
        return CONTROL_MODES.index(self.control_mode)

    def effective_processor_res(self) -> int:
        """What the preprocessor runs at when not pixel-perfect (-1 → 512) — what the extension records."""
        return resolve_processor_res(self.processor_res, self.field("processor_res"))

    def thresholds(self) -> tuple[float | None, float | None]:
        """(a, b) after the module's defaults; None where the module has no such slider."""
        spec = SPECS[self.module]
        return (resolve_threshold(self.threshold_a, spec.threshold_a, self.field("threshold_a")),
                resolve_threshold(self.threshold_b, spec.threshold_b, self.field("threshold_b")))

    def record(self) -> dict[str, Any]:
        """The unit for ``params.json`` (image as its size in bytes, not the pixels)."""
        data = asdict(self)
        data["image"] = None if self.image is None else {"bytes": len(self.image)}
        return data


def unit_field(index: int, name: str | None = None) -> str:
    base = f"alwayson_scripts.controlnet.args[{index}]"
    return f"{base}.{name}" if name else base


def _number(value: object, where: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidParameter(f"{where}: must be a number, got {value!r}", field=where)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidParameter(f"{where}: must be between {lo} and {hi}, got {value!r}", field=where)
    return float(value)


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidParameter(f"{where}: must be true or false, got {value!r}", field=where)
    return value


def _choice(value: object, choices: tuple[str, ...], where: str, aliases: dict[str, str] | None = None) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        if value == 3 and choices is RESIZE_MODES:  # the extension reads 3 ("latent upscale") as Just Resize
            return choices[0]
        if 0 <= value < len(choices):
            return choices[value]
    if isinstance(value, str):
        text = value.strip().lower()
        for choice in choices:
            if text == choice.lower():
                return choice
        if aliases and text in aliases:
            return aliases[text]
    allowed = ", ".join(f"{i} ({c!r})" for i, c in enumerate(choices))
    raise InvalidParameter(f"{where}: unknown value {value!r} (allowed: {allowed})", field=where)


def _image_parts(raw: dict[str, Any], where: str) -> tuple[object, object]:
    """(image, mask) from the shapes the extension accepts."""
    image, mask = raw.get("image"), raw.get("mask")
    if isinstance(image, dict):
        return image.get("image"), image.get("mask", mask)
    if isinstance(image, (list, tuple)):
        if len(image) == 1 and isinstance(image[0], dict):
            return image[0].get("image"), image[0].get("mask", mask)
        if len(image) == 2 and not isinstance(image[0], dict):
            return image[0], image[1]
        raise InvalidParameter(f"{where}: one image per unit (base64, {{image, mask}} or [image, mask])", field=where)
    return image, mask


def parse_unit(raw: object, index: int, *, max_pixels: int, warnings: list[str]) -> ControlUnit | None:
    """One ``args[index]`` entry → :class:`ControlUnit`, or None when the unit is disabled."""
    where = unit_field(index)
    if not isinstance(raw, dict):
        raise InvalidParameter(f"{where}: a ControlNet unit must be an object, got {type(raw).__name__}", field=where)
    unit: dict[str, Any] = {}
    for key, value in raw.items():
        new = _LEGACY.get(key, key)
        if new in unit and key != new:
            raise InvalidParameter(f"{unit_field(index, key)}: give either {key!r} or {new!r}", field=unit_field(index, key))
        unit[new] = value
    enabled = unit.get("enabled", True)
    if not _bool(enabled, unit_field(index, "enabled")):
        return None
    for key, what in _REFUSED.items():
        if unit.get(key) not in (None, [], ""):
            raise InvalidParameter(f"{unit_field(index, key)}: {what} are not supported", field=unit_field(index, key))
    unknown = sorted(set(unit) - _KNOWN - _INERT - set(_REFUSED))
    if unknown:
        warnings.append(f"{where}: ignored unknown fields {', '.join(unknown)}")
    module = normalize_module(unit.get("module", "none"), unit_field(index, "module"))
    model = unit.get("model")
    if not isinstance(model, str) or model.strip().lower() in ("", "none"):
        raise InvalidParameter(f"{unit_field(index, 'model')}: name the ControlNet model (e.g. 'control_v11p_sd15_canny')",
                               field=unit_field(index, "model"))
    out = ControlUnit(index=index, module=module, model=model.strip())
    if "weight" in unit:
        out.weight = _number(unit["weight"], unit_field(index, "weight"), 0.0, 2.0)
    for name in ("guidance_start", "guidance_end"):
        if name in unit:
            setattr(out, name, _number(unit[name], unit_field(index, name), 0.0, 1.0))
    if out.guidance_start > out.guidance_end:
        where_g = unit_field(index, "guidance_start")
        raise InvalidParameter(f"{where_g}: guidance_start ({out.guidance_start}) is after guidance_end ({out.guidance_end})", field=where_g)
    if unit.get("resize_mode") is not None:
        out.resize_mode = _choice(unit["resize_mode"], RESIZE_MODES, unit_field(index, "resize_mode"), _RESIZE_ALIASES)
    if unit.get("control_mode") is not None:
        out.control_mode = _choice(unit["control_mode"], CONTROL_MODES, unit_field(index, "control_mode"))
    if unit.get("hr_option") is not None:
        out.hr_option = _choice(unit["hr_option"], HR_OPTIONS, unit_field(index, "hr_option"))
    for name in ("pixel_perfect", "save_detected_map", "low_vram"):
        if unit.get(name) is not None:
            setattr(out, name, _bool(unit[name], unit_field(index, name)))
    if out.low_vram:
        warnings.append(f"{unit_field(index, 'low_vram')}: accepted, no effect on this server")
    if unit.get("guess_mode"):
        warnings.append(f"{unit_field(index, 'guess_mode')}: removed in the extension (1.1.136); use control_mode")
    res = unit.get("processor_res")
    if res is not None and res != -1:
        out.processor_res = resolve_processor_res(res, unit_field(index, "processor_res"))
    for name in ("threshold_a", "threshold_b"):
        if unit.get(name) is not None:
            setattr(out, name, _number(unit[name], unit_field(index, name)))
    image, mask = _image_parts(unit, unit_field(index, "image"))
    if image not in (None, ""):
        out.image = to_png_bytes(decode_image_b64(image, field=unit_field(index, "image"), max_pixels=max_pixels))
    if mask not in (None, ""):
        decode_image_b64(mask, field=unit_field(index, "mask"), max_pixels=max_pixels)
        out.has_mask = True
        warnings.append(f"{unit_field(index, 'mask')}: ignored (inpaint ControlNet masks are not supported)")
    return out


def parse_units(scripts: object, *, max_units: int, max_pixels: int, has_init_image: bool,
                warnings: list[str], prefix: str = "") -> list[ControlUnit]:
    """``alwayson_scripts.controlnet`` (``{"args": [unit, …]}``) → the enabled units, validated.

    Raises :class:`InvalidParameter` naming ``alwayson_scripts.controlnet.args[i].<field>`` (with
    ``prefix``, e.g. ``payload.``) for the first bad unit.
    """
    try:
        return _parse_units(scripts, max_units=max_units, max_pixels=max_pixels, has_init_image=has_init_image, warnings=warnings)
    except InvalidParameter as exc:
        if prefix:
            exc.field = prefix + (exc.field or "alwayson_scripts.controlnet")
            exc.message = prefix + exc.message if exc.message.startswith("alwayson_scripts") else exc.message
            exc.args = (exc.message,)
        raise


def _parse_units(scripts, *, max_units, max_pixels, has_init_image, warnings) -> list[ControlUnit]:
    if scripts in (None, {}):
        return []
    args = scripts.get("args") if isinstance(scripts, dict) else scripts
    if not isinstance(args, list):
        where = "alwayson_scripts.controlnet.args"
        raise InvalidParameter(f"{where}: must be a list of ControlNet units", field=where)
    units: list[ControlUnit] = []
    for index, raw in enumerate(args):
        unit = parse_unit(raw, index, max_pixels=max_pixels, warnings=warnings)
        if unit is None:
            continue
        if len(units) == max_units:
            where = unit_field(index)
            raise InvalidParameter(f"{where}: more than {max_units} enabled ControlNet units (MAX_CONTROLNET_UNITS)", field=where)
        if unit.image is None and not has_init_image:
            where = unit_field(index, "image")
            raise InvalidParameter(f"{where}: this unit has no image; txt2img needs one per enabled unit", field=where)
        units.append(unit)
    return units


def pixel_perfect_res(image_size: tuple[int, int], width: int, height: int, resize_mode: str) -> int:
    """The extension's pixel-perfect processor_res: the image's short side as it lands on the canvas."""
    raw_w, raw_h = image_size
    k_h, k_w = height / raw_h, width / raw_w
    k = min(k_h, k_w) if resize_mode == "Resize and Fill" else max(k_h, k_w)
    return round(k * min(raw_h, raw_w))


def fit_to_canvas(image: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """A detected map brought to the generation size the way the extension does it.

    Just Resize stretches; Crop and Resize covers the canvas and crops the centre;
    Resize and Fill fits inside and fills the bands with the median colour of the map's border.
    """
    image = image.convert("RGB")
    if image.size == (width, height) or resize_mode == "Just Resize":
        return image.resize((width, height), Image.Resampling.LANCZOS) if image.size != (width, height) else image
    raw_w, raw_h = image.size
    cover = resize_mode != "Resize and Fill"
    k = max(width / raw_w, height / raw_h) if cover else min(width / raw_w, height / raw_h)
    new_w, new_h = max(1, round(raw_w * k)), max(1, round(raw_h * k))
    scaled = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if cover:
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new("RGB", (width, height), _border_median(image))
    canvas.paste(scaled, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def _border_median(image: Image.Image) -> tuple[int, int, int]:
    w, h = image.size
    px = image.load()
    border = [px[x, 0] for x in range(w)] + [px[x, h - 1] for x in range(w)] + [px[0, y] for y in range(h)] + [px[w - 1, y] for y in range(h)]
    return tuple(sorted(p[c] for p in border)[len(border) // 2] for c in range(3))


def infotext_value(unit: ControlUnit, model_title: str, processor_res: int | None) -> str:
    """The unit as the extension's infotext writes it (``serialize_unit``): its fields in order, -1 values left out."""
    a, b = unit.thresholds()
    values: list[tuple[str, object]] = [
        ("Module", unit.module), ("Model", model_title), ("Weight", unit.weight), ("Resize Mode", unit.resize_mode),
        ("Low Vram", unit.low_vram), ("Processor Res", processor_res if processor_res is not None else -1),
        ("Threshold A", a if a is not None else -1), ("Threshold B", b if b is not None else -1),
        ("Guidance Start", unit.guidance_start), ("Guidance End", unit.guidance_end), ("Pixel Perfect", unit.pixel_perfect),
        ("Control Mode", unit.control_mode), ("Hr Option", unit.hr_option), ("Save Detected Map", unit.save_detected_map),
    ]
    return ", ".join(f"{k}: {v}" for k, v in values if v != -1 and "," not in str(v) and ":" not in str(v))


@dataclass
class UnitsRecord:
    """What a job's ControlNet units resolved to, for infotext and ``params.json``."""

    infotext: dict[str, str] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
