"""`--controlnet FILE`: units read, checked and inlined locally; they land in alwayson_scripts.controlnet.args."""

from __future__ import annotations

import base64
import json

import pytest

from client.config import CliError
from client.controlnet import MAX_UNITS, attach, load_unit, load_units
from tests.client.test_img2img import expect_invoke, input_body, png
from tests.client.test_submit_async import keys, stubbed  # noqa: F401 - fixture

UNIT = {"enabled": True, "module": "canny", "model": "control_sd15_canny", "weight": 0.8, "resize_mode": "Crop and Resize",
        "processor_res": 512, "threshold_a": 100, "threshold_b": 200, "guidance_start": 0.0, "guidance_end": 0.8,
        "pixel_perfect": False, "control_mode": 2, "save_detected_map": False}


def unit_file(folder, name="unit.json", **fields):
    path = folder / name
    path.write_text(json.dumps({**UNIT, **fields}))
    return path


def test_image_path_relative_to_the_unit_file(tmp_path, monkeypatch):
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "edges.png").write_bytes(png("white"))
    path = unit_file(tmp_path / "units", image="edges.png")
    monkeypatch.chdir(tmp_path)  # not the unit's folder: the path still resolves against it
    unit = load_unit(path)
    assert base64.b64decode(unit.pop("image")) == png("white")
    assert unit == UNIT  # every other field verbatim


def test_base64_and_data_url_kept_and_dict_images(tmp_path):
    b64 = base64.b64encode(png("green")).decode()
    assert load_unit(unit_file(tmp_path, image=b64))["image"] == b64
    data_url = "data:image/png;base64," + b64
    assert load_unit(unit_file(tmp_path, image=data_url))["image"] == data_url
    (tmp_path / "m.png").write_bytes(png(0, mode="L"))
    unit = load_unit(unit_file(tmp_path, image={"image": b64, "mask": "m.png"}))
    assert unit["image"]["image"] == b64 and base64.b64decode(unit["image"]["mask"]) == png(0, mode="L")
    assert load_unit(unit_file(tmp_path, image=None))["image"] is None  # a unit without an image (preprocessor off)


@pytest.mark.parametrize("content, words", [
    ("[1, 2]", "expected one JSON object"),
    ("{nope", "not valid JSON"),
    (json.dumps({**UNIT, "image": "missing.png"}), "neither an image file"),
    (json.dumps({**UNIT, "image": "bm90IGFuIGltYWdl"}), "neither an image file"),  # base64 of text
    (json.dumps({**UNIT, "weight": "high"}), "weight must be a number"),
    (json.dumps({**UNIT, "enabled": "yes"}), "enabled must be true or false"),
    (json.dumps({**UNIT, "guidance_start": 0.9, "guidance_end": 0.2}), "guidance_start"),
    (json.dumps({**UNIT, "control_mode": 3}), "control_mode"),
    (json.dumps({**UNIT, "resize_mode": "Stretch"}), "resize_mode"),
    (json.dumps({**UNIT, "processor_res": 1.5}), "processor_res"),
])
def test_bad_units_name_file_and_field(tmp_path, content, words):
    path = tmp_path / "u.json"
    path.write_text(content)
    with pytest.raises(CliError) as err:
        load_unit(path)
    assert err.value.code == 2 and str(path) in err.value.message and words in err.value.message


def test_unit_count_and_missing_file(tmp_path):
    path = unit_file(tmp_path, image=base64.b64encode(png("red")).decode())
    assert len(load_units([path] * MAX_UNITS)) == MAX_UNITS
    with pytest.raises(CliError, match="at most 10"):
        load_units([path] * (MAX_UNITS + 1))
    with pytest.raises(CliError, match="no such file"):
        load_units([tmp_path / "none.json"])


def test_attach_keeps_other_scripts():
    payload = {"prompt": "p", "alwayson_scripts": {"other": {"args": [1]}, "controlnet": {"args": ["old"]}}}
    out = attach(payload, [{"model": "m"}])
    assert out["alwayson_scripts"] == {"other": {"args": [1]}, "controlnet": {"args": [{"model": "m"}]}}
    assert attach(payload, []) is payload and payload["alwayson_scripts"]["controlnet"] == {"args": ["old"]}


def test_txt2img_and_img2img_send_units(sdctl, s3_client, s3_bucket, stubbed, tmp_path):  # noqa: F811
    sm_stub, rt_stub, clients = stubbed
    (tmp_path / "pose.png").write_bytes(png("black"))
    first = unit_file(tmp_path, "a.json", image="pose.png", module="openpose", model="control_openpose")
    second = unit_file(tmp_path, "b.json", image=str(tmp_path / "pose.png"), weight=0.3)
    expect_invoke(sm_stub, rt_stub, "c-1")
    result = sdctl("--output", f"s3://{s3_bucket}/out/", "txt2img", "-p", "x", "--controlnet", first, "--controlnet", second,
                   "--endpoint", "sd-async", "--id", "c-1", clients=clients)
    assert result.exit_code == 0, result.output
    args = input_body(s3_client, s3_bucket, "c-1")["payload"]["alwayson_scripts"]["controlnet"]["args"]
    assert [(u["module"], u["model"], u["weight"]) for u in args] == [("openpose", "control_openpose", 0.8), ("canny", "control_sd15_canny", 0.3)]
    assert all(base64.b64decode(u["image"]) == png("black") for u in args)

    (tmp_path / "init.png").write_bytes(png("red"))
    expect_invoke(sm_stub, rt_stub, "c-2")
    result = sdctl("--output", f"s3://{s3_bucket}/out/", "img2img", "-i", tmp_path / "init.png", "--controlnet", first,
                   "--endpoint", "sd-async", "--id", "c-2", clients=clients)
    assert result.exit_code == 0, result.output
    body = input_body(s3_client, s3_bucket, "c-2")
    assert body["task"] == "img2img" and len(body["payload"]["alwayson_scripts"]["controlnet"]["args"]) == 1

    before = keys(s3_client, s3_bucket)
    bad = unit_file(tmp_path, "bad.json", image="nowhere.png")
    result = sdctl("--output", f"s3://{s3_bucket}/out/", "txt2img", "-p", "x", "--controlnet", bad, "--endpoint", "sd-async",
                   clients=clients)
    assert result.exit_code == 2 and "bad.json" in result.output
    assert keys(s3_client, s3_bucket) == before
