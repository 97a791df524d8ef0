"""sd-webui-controlnet API units: parsing, defaults, legacy keys, and 422s naming args[i].field."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from pipelines.control_units import (
    ControlUnit,
    fit_to_canvas,
    infotext_value,
    parse_units,
    pixel_perfect_res,
)
from pipelines.errors import InvalidParameter

MAX_PIXELS = 1024 * 1024


def b64_png(size=(32, 24), color=(200, 10, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def bomb_png(width=50_000, height=50_000) -> str:
    """A tiny PNG whose header claims a huge image (never decoded if the guard works)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def parse(args, *, max_units=10, init=False, warnings=None):
    return parse_units({"args": args}, max_units=max_units, max_pixels=MAX_PIXELS, has_init_image=init,
                       warnings=[] if warnings is None else warnings)


def unit(**kw):
    return {"module": "canny", "model": "control_v11p_sd15_canny [d14c016b]", "image": b64_png(), **kw}


def test_defaults_are_the_extensions():
    [u] = parse([unit()])
    assert (u.weight, u.resize_mode, u.control_mode, u.guidance_start, u.guidance_end) == (1.0, "Crop and Resize", "Balanced", 0.0, 1.0)
    assert u.save_detected_map is True and u.pixel_perfect is False and u.processor_res == -1
    assert Image.open(io.BytesIO(u.image)).size == (32, 24)


def test_numbers_names_legacy_keys_and_disabled_units():
    warnings: list[str] = []
    units = parse([
        {**unit(), "enabled": False},
        {"module": "none", "model": "cn", "input_image": b64_png(), "guidance": 0.4, "lowvram": True,
         "resize_mode": 2, "control_mode": 1, "weight": 0.5},
        unit(resize_mode="Just Resize", control_mode="ControlNet is more important", image={"image": b64_png(), "mask": None}),
        unit(image=[b64_png(), b64_png()], resize_mode="Inner Fit (Scale to Fit)", extra_field=1, hr_option="Low res only"),
    ], warnings=warnings)
    assert [u.index for u in units] == [1, 2, 3]
    u1, u2, u3 = units
    assert (u1.guidance_end, u1.low_vram, u1.resize_mode, u1.control_mode, u1.weight) == (0.4, True, "Resize and Fill", "My prompt is more important", 0.5)
    assert (u2.resize_mode, u2.control_mode) == ("Just Resize", "ControlNet is more important")
    assert u3.resize_mode == "Crop and Resize" and u3.has_mask and u3.hr_option == "Low res only"
    text = " | ".join(warnings)
    assert "args[1].low_vram" in text and "no effect" in text and "extra_field" in text and "args[3].mask" in text


@pytest.mark.parametrize("bad, field, match", [
    (unit(module="no_such_preprocessor"), "args[0].module", "known preprocessors"),
    (unit(model="None"), "args[0].model", "name the ControlNet"),
    (unit(image="!!!not base64 at all"), "args[0].image", "decodable|base64"),
    (unit(image=base64.b64encode(b"not an image").decode()), "args[0].image", "decodable"),
    (unit(image=bomb_png()), "args[0].image", "pixels|too large"),
    (unit(guidance_start=0.8, guidance_end=0.2), "args[0].guidance_start", "after guidance_end"),
    (unit(weight=3), "args[0].weight", "between"),
    (unit(weight="1"), "args[0].weight", "number"),
    (unit(resize_mode="Stretch"), "args[0].resize_mode", "allowed"),
    (unit(control_mode=5), "args[0].control_mode", "allowed"),
    (unit(enabled="yes"), "args[0].enabled", "true or false"),
    (unit(advanced_weighting=[1.0] * 13), "args[0].advanced_weighting", "not supported"),
    ("not a unit", "args[0]", "object"),
])
def test_bad_units_name_index_and_field(bad, field, match):
    with pytest.raises(InvalidParameter, match=match) as err:
        parse([bad])
    assert err.value.field == f"alwayson_scripts.controlnet.{field}"


def test_later_unit_index_and_prefix():
    with pytest.raises(InvalidParameter) as err:
        parse_units({"args": [unit(), unit(weight=-1)]}, max_units=10, max_pixels=MAX_PIXELS, has_init_image=False,
                    warnings=[], prefix="payload.")
    assert err.value.field == "payload.alwayson_scripts.controlnet.args[1].weight"
    assert err.value.message.startswith("payload.alwayson_scripts.controlnet.args[1].weight")


def test_unit_count_limit_counts_enabled_units():
    parse([unit(), {**unit(), "enabled": False}, unit()], max_units=2)
    with pytest.raises(InvalidParameter, match="more than 2") as err:
        parse([unit(), unit(), unit()], max_units=2)
    assert err.value.field == "alwayson_scripts.controlnet.args[2]"


def test_missing_image_uses_init_image_or_fails_for_txt2img():
    [u] = parse([unit(image=None)], init=True)
    assert u.image is None
    with pytest.raises(InvalidParameter, match="no image") as err:
        parse([unit(image=None)])
    assert err.value.field == "alwayson_scripts.controlnet.args[0].image"


def test_empty_controlnet_scripts():
    assert parse_units(None, max_units=1, max_pixels=MAX_PIXELS, has_init_image=False, warnings=[]) == []
    assert parse([]) == []
    with pytest.raises(InvalidParameter):
        parse_units({"args": "x"}, max_units=1, max_pixels=MAX_PIXELS, has_init_image=False, warnings=[])


def test_infotext_value_is_the_extensions_format():
    u = ControlUnit(index=0, module="canny", model="control_v11p_sd15_canny")
    text = infotext_value(u, "control_v11p_sd15_canny [d14c016b]", 512)
    assert text == ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and Resize, "
                    "Low Vram: False, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, "
                    "Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced, Hr Option: Both, Save Detected Map: True")
    none = infotext_value(ControlUnit(index=1, module="none", model="m"), "m [12345678]", None)
    assert "Processor Res" not in none and "Threshold A" not in none


def test_pixel_perfect_and_canvas_fit():
    assert pixel_perfect_res((1000, 500), 512, 512, "Crop and Resize") == 512
    assert pixel_perfect_res((1000, 500), 512, 512, "Resize and Fill") == 256
    img = Image.new("RGB", (100, 50), (10, 20, 30))
    for mode in ("Just Resize", "Crop and Resize", "Resize and Fill"):
        assert fit_to_canvas(img, 64, 96, mode).size == (64, 96)
    filled = fit_to_canvas(img, 64, 64, "Resize and Fill")
    assert filled.getpixel((0, 0)) == (10, 20, 30)  # bands filled with the border's median colour
    half = Image.new("RGB", (100, 50), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 10, 50))  # white strip at the left edge
    cropped = fit_to_canvas(half, 50, 50, "Crop and Resize")
    assert cropped.getpixel((0, 25)) == (0, 0, 0)  # the centre was kept, the left strip cropped
