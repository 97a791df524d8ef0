"""A1111's resize modes on synthetic images whose content tells where each pixel came from."""

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import InvalidParameter
from pipelines.resize import resize_image, resize_mode_index


def halves(width, height):
    """Left half red, right half blue (wide) — the centre column tells what was kept."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(array)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_every_mode_gives_the_target_size(mode):
    for source in ((200, 100), (100, 200), (64, 64)):
        assert resize_image(halves(*source), mode, 96, 64).size == (96, 64)


def test_latent_mode_leaves_the_pixels_alone():
    image = halves(200, 100)
    assert resize_image(image, 3, 64, 64) is image


def test_crop_and_resize_keeps_the_centre_and_crops_the_sides():
    # 4:1 source into a square: only the middle quarter-width survives, half red half blue
    out = np.asarray(resize_image(halves(400, 100), 1, 64, 64))
    assert out[32, 2].tolist() == [255, 0, 0] and out[32, 61].tolist() == [0, 0, 255]
    assert not (out == 0).all(axis=2).any()  # covered: no empty pixel


def test_resize_and_fill_stretches_the_edges_into_the_bands():
    # a wide source into a square: fits the width, bands above and below filled from the edge rows
    array = np.zeros((50, 200, 3), np.uint8)
    array[:10, :] = (0, 255, 0)  # top rows green
    array[-10:, :] = (255, 255, 0)  # bottom rows yellow
    out = np.asarray(resize_image(Image.fromarray(array), 2, 64, 64))
    assert (out[0:4, :, 1] > 150).all() and (out[-4:, :, 0] > 150).all()
    assert out[32, 32].tolist() == [0, 0, 0]


def test_just_resize_stretches():
    out = np.asarray(resize_image(halves(400, 100), 0, 64, 64))
    assert out[32, 5].tolist() == [255, 0, 0] and out[32, 60].tolist() == [0, 0, 255]


def test_mode_names_and_numbers():
    assert resize_mode_index("Crop and resize", field="f") == 1
    assert resize_mode_index("just resize (latent upscale)", field="f") == 3
    assert resize_mode_index(2, field="f") == 2
    assert resize_mode_index("1", field="f") == 1
    for bad in (4, -1, True, "Zoom", None, 1.5):
        with pytest.raises(InvalidParameter) as info:
            resize_mode_index(bad, field="payload.resize_mode")
        assert info.value.field == "payload.resize_mode" and "Crop and resize" in info.value.message
    with pytest.raises(InvalidParameter):
        resize_mode_index(3, field="f", allow_latent=False)
