"""Images by location in the envelope (s3:// and file://): fenced before any read, size-capped, recorded."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from pipelines.errors import Forbidden, InvalidParameter
from serve.image_uris import image_slots, inline_image_uris
from serve.settings import Settings
from tests.model_cache.test_store import CountingClient


def png(size=(8, 8), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def settings(tmp_path):
    (tmp_path / "out").mkdir()
    return Settings(model_store=str(tmp_path / "models"), output=str(tmp_path / "out"))


def envelope(**payload) -> dict:
    return {"task": "img2img", "payload": {"prompt": "p", **payload}}


def test_slots_cover_init_images_mask_and_controlnet_units():
    unit = {"image": {"image": "s3://b/x.png", "mask": "file:///m.png"}, "input_image": "s3://b/y.png", "mask": "iVBORw0KGgo="}
    payload = {"init_images": ["iVBORw0KGgo=", "s3://b/i.png"], "mask": "file:///mask.png",
               "alwayson_scripts": {"ControlNet": {"args": [unit, "junk"]}, "other": {"args": [{"image": "s3://b/z.png"}]}}}
    assert [f for _c, _k, f in image_slots(payload)] == [
        "init_images[1]", "mask", "alwayson_scripts.controlnet.args[0].image.image", "alwayson_scripts.controlnet.args[0].image.mask",
        "alwayson_scripts.controlnet.args[0].input_image"]


def test_file_uris_inside_a_local_output_are_inlined(settings, tmp_path):
    data = png()
    (tmp_path / "out" / "job-1").mkdir()
    (tmp_path / "out" / "job-1" / "image-0.png").write_bytes(data)
    uri = f"file://{tmp_path}/out/job-1/image-0.png"
    body = envelope(init_images=[uri])
    sources = inline_image_uris(body, settings, client_factory=None)
    assert sources == {"payload.init_images[0]": uri}
    assert base64.b64decode(body["payload"]["init_images"][0]) == data


@pytest.mark.parametrize("where, error, words", [
    ("{tmp}/elsewhere.png", Forbidden, "outside the OUTPUT folder"),
    ("{tmp}/out/../elsewhere.png", Forbidden, "outside the OUTPUT folder"),
    ("{tmp}/out/link.png", Forbidden, "outside the OUTPUT folder"),  # a symlink out of the folder
    ("out/relative.png", Forbidden, "outside the OUTPUT folder"),
    ("{tmp}/out/missing.png", InvalidParameter, "does not exist"),
    ("{tmp}/out", InvalidParameter, "is a folder"),
    ("{tmp}/out/big.png", InvalidParameter, "more than"),
])
def test_file_uris_are_fenced_and_checked(settings, tmp_path, where, error, words):
    (tmp_path / "elsewhere.png").write_bytes(png())
    (tmp_path / "out" / "link.png").symlink_to(tmp_path / "elsewhere.png")
    small = settings.model_copy(update={"max_pixels": 64 * 64, "max_side": 64})
    (tmp_path / "out" / "big.png").write_bytes(b"\0" * (64 * 64 * 4 * 4 + (1 << 20) + 1))
    body = envelope(mask="file://" + where.format(tmp=tmp_path))
    with pytest.raises(error) as info:
        inline_image_uris(body, small, client_factory=None)
    assert words in info.value.message and info.value.field == "payload.mask"


def test_file_uris_need_a_local_output(settings):
    on_s3 = settings.model_copy(update={"output": "s3://some-bucket/out/"})
    with pytest.raises(Forbidden) as info:
        inline_image_uris(envelope(init_images=["file:///tmp/x.png"]), on_s3, client_factory=None)
    assert "local OUTPUT" in info.value.message


def test_s3_uris_are_fenced_before_any_read(settings, s3_client, s3_bucket):
    data = png()
    s3_client.put_object(Bucket=s3_bucket, Key="out/job-1/image-0.png", Body=data)
    s3_client.put_object(Bucket=s3_bucket, Key="private/x.png", Body=data)
    on_s3 = settings.model_copy(update={"output": f"s3://{s3_bucket}/out/"})
    counting = CountingClient(s3_client)
    unit = {"enabled": True, "module": "canny", "model": "m", "image": f"s3://{s3_bucket}/out/job-1/image-0.png"}
    body = envelope(init_images=[f"s3://{s3_bucket}/out/job-1/image-0.png"],
                    alwayson_scripts={"controlnet": {"args": [unit, {**unit, "image": f"s3://{s3_bucket}/private/x.png"}]}})
    with pytest.raises(Forbidden) as info:
        inline_image_uris(body, on_s3, client_factory=lambda: counting)
    assert info.value.field == "payload.alwayson_scripts.controlnet.args[1].image" and "ALLOWED_S3_PREFIXES" in info.value.message
    assert counting.calls == []  # refused before the first read
    body["payload"]["alwayson_scripts"]["controlnet"]["args"][1]["image"] = "file:///etc/passwd"
    with pytest.raises(Forbidden):
        inline_image_uris(body, on_s3, client_factory=lambda: counting)  # file:// needs a local OUTPUT
    assert counting.calls == []
    body["payload"]["alwayson_scripts"]["controlnet"]["args"].pop()
    sources = inline_image_uris(body, on_s3, client_factory=lambda: counting)
    assert list(sources) == ["payload.init_images[0]", "payload.alwayson_scripts.controlnet.args[0].image"]
    assert base64.b64decode(unit["image"]) == data and base64.b64decode(body["payload"]["init_images"][0]) == data
    with pytest.raises(InvalidParameter) as missing:
        inline_image_uris(envelope(mask=f"s3://{s3_bucket}/out/nope.png"), on_s3, client_factory=lambda: counting)
    assert "does not exist" in missing.value.message and missing.value.field == "payload.mask"


def test_bare_bodies_keep_base64_only(settings):
    from serve.requests import build_job

    body = {"prompt": "p", "init_images": ["s3://bucket-name/x.png"]}
    assert inline_image_uris(body, settings, client_factory=None) == {}
    with pytest.raises(InvalidParameter) as info:
        build_job(body, settings)
    assert "envelope" in info.value.message and info.value.field == "init_images[0]"
