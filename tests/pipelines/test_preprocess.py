"""ControlNet preprocessors: extension names, output sizes, thresholds, caching, offline loading.

Networks are the real controlnet-aux architectures with random weights
(tests/support/annotator_files.py). Every test here runs with sockets disabled.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines import preprocess_names as names
from pipelines.errors import InvalidParameter, ModelNotFound, ModelRejected
from pipelines.preprocess import (
    Preprocessors,
    known_modules,
    normalize_module,
    weight_files,
)

ROOT = Path(__file__).resolve().parents[2]
FIELD = "alwayson_scripts.controlnet.args[0].module"


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Any connection attempt fails the test: annotators must load from the folder alone."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def pre(annotators_dir) -> Preprocessors:
    """One instance for the module: each network loads once, as in the worker."""
    return Preprocessors(annotators_dir)


def scene(width: int = 100, height: int = 72, mode: str = "RGB") -> Image.Image:
    """A small picture with edges and straight lines (canny and M-LSD have something to find)."""
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                       np.full((height, width), 90.0)], axis=2).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.rectangle((15, 12, 55, 50), fill=(250, 250, 250))
    draw.line((5, 65, 95, 5), fill=(0, 0, 0), width=3)
    draw.ellipse((60, 20, 90, 60), fill=(20, 40, 200))
    return image.convert(mode)


def extension_size(width: int, height: int, res: int) -> tuple[int, int]:
    """The map size sd-webui-controlnet returns: short side ``res``, long side rounded."""
    k = res / min(width, height)
    return round(width * k), round(height * k)


def test_names_accept_the_extension_spellings():
    assert normalize_module("depth") == "depth_midas"
    assert normalize_module("hed") == "softedge_hed"
    assert normalize_module("lineart") == "lineart_realistic"
    assert normalize_module("normal_map") == "normal_midas"
    assert normalize_module("invert (from white bg & black line)") == "invert"
    assert normalize_module("lineart_standard (from white bg & black line)") == "lineart_standard"
    assert normalize_module(" Canny ") == "canny"
    assert normalize_module(None) == normalize_module("") == normalize_module("None") == "none"
    required = {"none", "canny", "openpose", "openpose_hand", "openpose_face", "openpose_full", "depth_midas",
                "softedge_hed", "mlsd", "lineart_realistic", "lineart_anime", "normal_bae", "shuffle", "invert"}
    assert required <= set(known_modules())


@pytest.mark.parametrize("module", ["cany", "depth_zoe", "openpose_fulll"])
def test_unknown_module_is_422_listing_known(module):
    with pytest.raises(InvalidParameter) as info:
        normalize_module(module, FIELD)
    assert info.value.field == FIELD
    assert module in info.value.message
    for known in known_modules():
        assert known in info.value.message
    if module == "depth_zoe":
        assert "does not provide" in info.value.message


def test_run_refuses_unknown_module_and_bad_values(pre):
    with pytest.raises(InvalidParameter) as info:
        pre.run("nope", scene(), field=FIELD)
    assert info.value.field == FIELD
    with pytest.raises(InvalidParameter) as info:
        pre.run("canny", scene(), processor_res=10_000, field=FIELD)
    assert info.value.field == "alwayson_scripts.controlnet.args[0].processor_res"
    with pytest.raises(InvalidParameter) as info:
        pre.run("canny", scene(4000, 2), processor_res=512, field=FIELD)  # 1 024 000 x 512 map
    assert info.value.field == "alwayson_scripts.controlnet.args[0].processor_res"
    with pytest.raises(InvalidParameter) as info:
        pre.run("canny", scene(), threshold_a="high", field=FIELD)
    assert info.value.field == "alwayson_scripts.controlnet.args[0].threshold_a"


def test_weight_files_name_exactly_what_a_module_loads():
    assert weight_files("canny") == [] and not names.needs_weights("shuffle")
    assert weight_files("openpose") == ["body_pose_model.pth"]
    assert weight_files("openpose_hand") == ["body_pose_model.pth", "hand_pose_model.pth"]
    assert weight_files("openpose_full") == ["body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"]
    assert weight_files("depth") == ["dpt_hybrid-midas-501f0c75.pt"]
    assert weight_files("hed") == ["ControlNetHED.pth"]
    assert weight_files("lineart_anime") == ["netG.pth"]
    assert weight_files("normal_bae") == ["scannet.pt"]
    assert names.needs_weights("mlsd")


def test_names_module_imports_without_torch():
    code = "import sys, pipelines.preprocess_names; print(sorted({'torch', 'numpy', 'controlnet_aux', 'PIL'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", known_modules())
def test_every_module_returns_the_extension_size(pre, module):
    # Portrait and small: OpenPose always scales the image to 184 px high, so a narrow one is cheapest.
    image = scene(60, 90)
    out = pre.run(module, image, processor_res=64, seed=0, field=FIELD)
    assert out.mode == "RGB"
    if module in ("none", "invert"):
        assert out.size == image.size  # the extension does not resize these
    else:
        assert out.size == extension_size(*image.size, 64) == (64, 96)
    if module.startswith("openpose") or module == "mlsd":
        return  # random networks find no person and no line segment: the map is black
    pixels = np.asarray(out)
    assert pixels.std() > 1, f"{module} returned a flat map"
    if module == "normal_midas":  # threshold_a is the background cut (depth below it: flat normal)
        cut = pre.run(module, image, processor_res=64, threshold_a=0.9, field=FIELD)
        assert not np.array_equal(pixels, np.asarray(cut))
    if module in ("depth_midas", "normal_midas", "normal_bae", "lineart_anime"):
        return  # the big networks: one run is enough here
    again = pre.run(module, image, processor_res=64, seed=0, field=FIELD)
    assert np.array_equal(pixels, np.asarray(again))


def test_none_and_invert_keep_pixels_and_lay_alpha_over_white(pre):
    image = scene()
    assert np.array_equal(np.asarray(pre.run("none", image)), np.asarray(image))
    assert np.array_equal(np.asarray(pre.run("invert (from white bg & black line)", image)), 255 - np.asarray(image))
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(pre.run("none", clear)).min() == 255


def test_processor_res_default_and_size_for_portrait(pre):
    out = pre.run("canny", scene(80, 120), processor_res=-1)
    assert out.size == (512, 768)
    out = pre.run("lineart_standard", scene(80, 120, mode="L"), processor_res=100)
    assert out.size == (100, 150)


def test_canny_thresholds_have_the_extension_meaning(pre):
    image = scene()
    default = np.asarray(pre.run("canny", image, processor_res=64))
    explicit = np.asarray(pre.run("canny", image, processor_res=64, threshold_a=100, threshold_b=200))
    low = np.asarray(pre.run("canny", image, processor_res=64, threshold_a=1, threshold_b=2))
    assert np.array_equal(default, explicit)
    assert (low > 0).sum() > (default > 0).sum() > 0
    # The extension's steps: short side to 64 (INTER_AREA when shrinking), edge-pad to 64-multiples, detect, crop.
    import cv2

    small = cv2.resize(np.asarray(image), (89, 64), interpolation=cv2.INTER_AREA)
    padded = np.pad(small, ((0, 0), (0, 39), (0, 0)), mode="edge")
    assert np.array_equal(default[:, :, 0], cv2.Canny(padded, 100, 200)[:, :89])


def test_shuffle_is_reproducible_by_seed(pre):
    image = scene()
    a = np.asarray(pre.run("shuffle", image, processor_res=64, seed=1))
    b = np.asarray(pre.run("shuffle", image, processor_res=64, seed=1))
    c = np.asarray(pre.run("shuffle", image, processor_res=64, seed=2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_networks_load_once_and_are_reused(annotators_dir):
    pre = Preprocessors(annotators_dir)
    started = time.perf_counter()
    first = pre.network("ControlNetHED.pth")
    first_seconds = time.perf_counter() - started
    started = time.perf_counter()
    second = pre.network("ControlNetHED.pth")
    cached_seconds = time.perf_counter() - started
    assert second is first
    assert cached_seconds < first_seconds / 10
    assert pre.loaded() == ["ControlNetHED.pth"]
    pre.run("softedge_hed", scene(), processor_res=64)
    pre.run("scribble_hed", scene(), processor_res=64)  # same network, other module
    assert pre.network("ControlNetHED.pth") is first and pre.loaded() == ["ControlNetHED.pth"]
    pre.clear()
    assert pre.loaded() == [] and pre.network("ControlNetHED.pth") is not first


@pytest.mark.parametrize("file_name", ["body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"])
def test_openpose_key_layout_and_fp16_files_load_exactly(pre, annotators_dir, file_name):
    # Body and hand files name keys without the model's first component; the face file uses its own names.
    net = pre.network(file_name).model
    published = torch.load(annotators_dir / file_name, weights_only=True)
    loaded = net.state_dict()
    drop = file_name != "facenet.pth"
    assert set(published) == {k.split(".", 1)[1] if drop else k for k in loaded}
    for key, value in loaded.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, published[key.split(".", 1)[1] if drop else key].float())
    assert next(net.parameters()).device.type == pre.device


def test_missing_annotator_is_404_naming_file(tmp_path):
    pre = Preprocessors(tmp_path)
    with pytest.raises(ModelNotFound) as info:
        pre.run("openpose_full", scene(), field=FIELD)
    assert "body_pose_model.pth" in info.value.message and "annotators/" in info.value.message
    assert info.value.field == FIELD
    assert pre.run("canny", scene(), processor_res=64).size == (89, 64)  # weight-free ones still work
    with pytest.raises(ModelNotFound):
        Preprocessors(None).run("hed", scene())


def test_source_function_is_asked_for_each_file(annotators_dir):
    asked = []

    def fetch(file_name):
        asked.append(file_name)
        return annotators_dir / file_name

    pre = Preprocessors(fetch)
    assert pre.run("lineart_coarse", scene(), processor_res=64).size == (89, 64)
    assert asked == ["sk_model2.pth"]

    def store_without(file_name):
        raise ModelNotFound(f"annotators model '{file_name}' not found in s3://b/annotators/", field="name")

    with pytest.raises(ModelNotFound) as info:
        Preprocessors(store_without).run("mlsd", scene(), field=FIELD)
    assert info.value.field == FIELD and "mlsd_large_512_fp32.pth" in info.value.message


def test_wrong_or_unsafe_files_are_rejected(tmp_path, annotators_dir):
    shutil.copy(annotators_dir / "sk_model.pth", tmp_path / "ControlNetHED.pth")
    with pytest.raises(ModelRejected) as info:
        Preprocessors(tmp_path).run("softedge_hed", scene())
    assert "ControlNetHED.pth" in info.value.message

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    with open(tmp_path / "sk_model.pth", "wb") as handle:
        pickle.dump({"weight": Payload()}, handle)
    with pytest.raises(ModelRejected) as info:
        Preprocessors(tmp_path).run("lineart", scene())
    assert "sk_model.pth" in info.value.message


def test_changed_file_is_reloaded_and_safetensors_preferred(tmp_path, annotators_dir):
    from safetensors.torch import save_file

    shutil.copy(annotators_dir / "sk_model.pth", tmp_path / "sk_model.pth")
    pre = Preprocessors(tmp_path)
    fine = pre.network("sk_model.pth")
    before = np.asarray(pre.run("lineart", scene(), processor_res=64))
    shutil.copy(annotators_dir / "sk_model2.pth", tmp_path / "sk_model.pth")
    os.utime(tmp_path / "sk_model.pth", ns=(time.time_ns() + 10**9,) * 2)
    assert pre.network("sk_model.pth") is not fine
    assert not np.array_equal(before, np.asarray(pre.run("lineart", scene(), processor_res=64)))

    tensors = torch.load(annotators_dir / "sk_model.pth", weights_only=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "sk_model.safetensors")
    converted = Preprocessors(tmp_path)
    assert np.array_equal(before, np.asarray(converted.run("lineart", scene(), processor_res=64)))


def test_sockets_really_are_blocked():
    with pytest.raises(AssertionError, match="network access"):
        socket.create_connection(("127.0.0.1", 9))
