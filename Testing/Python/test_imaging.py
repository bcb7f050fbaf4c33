"""Tests of input preparation: RGB conversion, windowing, letterboxing and mapping maps back to the image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.imaging import Letterbox, clip_input, compute_window, to_rgb_uint8

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SHAPES = [
    (300, 500), (500, 300), (301, 499), (37, 101), (7, 3), (150, 90), (223, 225), (2, 2), (224, 224), (1001, 17),
    (1000, 2), (3, 1000),
]


# ----------------------------------------------------------------------------------------------------------------------
# to_rgb_uint8 and compute_window


def test_uint8_gray_is_replicated():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = to_rgb_uint8(gray)
    assert rgb.shape == (3, 4, 3)
    assert rgb.dtype == np.uint8
    for channel in range(3):
        assert np.array_equal(rgb[:, :, channel], gray)


def test_uint8_single_channel_axis_accepted():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    rgb = to_rgb_uint8(gray)
    assert np.array_equal(rgb[:, :, 2], gray[:, :, 0])


def test_uint8_rgb_used_as_is_and_copied():
    rgb_in = np.random.RandomState(0).randint(0, 256, size=(5, 6, 3)).astype(np.uint8)
    rgb = to_rgb_uint8(rgb_in)
    assert np.array_equal(rgb, rgb_in)
    assert not np.shares_memory(rgb, rgb_in)


def test_uint8_window_ignored():
    rgb_in = np.full((4, 4, 3), 7, dtype=np.uint8)
    assert np.array_equal(to_rgb_uint8(rgb_in, window=(0, 1)), rgb_in)


def test_alpha_dropped_not_composited():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 1] = 100
    rgba[..., 2] = 50
    rgba[..., 3] = 0  # fully transparent: compositing on black would give 0
    rgb = to_rgb_uint8(rgba)
    assert rgb.shape == (4, 4, 3)
    assert np.array_equal(rgb[0, 0], [200, 100, 50])


def test_gray_alpha_keeps_gray():
    gray_alpha = np.zeros((3, 3, 2), dtype=np.uint8)
    gray_alpha[..., 0] = 90
    rgb = to_rgb_uint8(gray_alpha)
    assert np.all(rgb == 90)


def test_bool_becomes_0_and_255():
    mask = np.array([[True, False], [False, True]])
    rgb = to_rgb_uint8(mask)
    assert np.array_equal(rgb[:, :, 0], [[255, 0], [0, 255]])
    assert rgb.dtype == np.uint8


def test_uint16_given_window_rescales():
    image = np.array([[0, 200, 1000], [1500, 400, 600]], dtype=np.uint16)
    rgb = to_rgb_uint8(image, window=(0, 1000))
    assert np.array_equal(rgb[:, :, 0], [[0, 51, 255], [255, 102, 153]])


def test_negative_int16_window_rescales():
    image = np.array([[-1000, 0], [1000, 3000]], dtype=np.int16)
    rgb = to_rgb_uint8(image, window=(-1000.0, 1000.0))
    assert np.array_equal(rgb[:, :, 0], [[0, 128], [255, 255]])


def test_default_window_uses_percentiles():
    image = np.arange(10000, dtype=np.float32).reshape(100, 100)
    low, high = compute_window(image)
    assert low == pytest.approx(np.percentile(np.arange(10000.0), 0.5))
    assert high == pytest.approx(np.percentile(np.arange(10000.0), 99.5))
    rgb = to_rgb_uint8(image)
    assert rgb[0, 0, 0] == 0
    assert rgb[-1, -1, 0] == 255
    assert rgb[50, 0, 0] == round((5000 - low) / (high - low) * 255)


def test_nan_and_inf_become_window_minimum():
    image = np.array([[np.nan, np.inf, -np.inf], [0.0, 5.0, 10.0]], dtype=np.float64)
    rgb = to_rgb_uint8(image, window=(0.0, 10.0))
    assert np.array_equal(rgb[0, :, 0], [0, 0, 0])
    assert np.array_equal(rgb[1, :, 0], [0, 128, 255])


def test_nan_ignored_by_default_window():
    image = np.array([[np.nan, 0.0], [10.0, 10.0]], dtype=np.float32)
    assert compute_window(image) == pytest.approx((0.1, 10.0))  # percentiles of [0, 10, 10]
    assert to_rgb_uint8(image)[0, 0, 0] == 0


def test_sparse_object_window_falls_back_to_min_max():
    image = np.zeros((100, 100), dtype=np.uint16)
    image[0, :10] = 400  # 0.1 % of the pixels: both percentiles are 0
    assert compute_window(image) == (0.0, 400.0)
    assert to_rgb_uint8(image)[0, 0, 0] == 255


def test_constant_image_rejected():
    with pytest.raises(InvalidInputError, match="no contrast"):
        to_rgb_uint8(np.full((8, 8), 42.0, dtype=np.float32))


def test_all_nan_image_rejected():
    with pytest.raises(InvalidInputError, match="no contrast: it has no finite values"):
        to_rgb_uint8(np.full((8, 8), np.nan, dtype=np.float32))


def test_constant_image_with_window_accepted():
    rgb = to_rgb_uint8(np.full((4, 4), 5.0), window=(0.0, 10.0))
    assert np.all(rgb == 128)


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 1), (1, 5, 3)])
def test_too_small_image_rejected(shape):
    with pytest.raises(InvalidInputError, match="too small"):
        to_rgb_uint8(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("shape", [(4,), (2, 4, 4, 3), (4, 4, 5)])
def test_wrong_dimensions_rejected(shape):
    with pytest.raises(InvalidInputError):
        to_rgb_uint8(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("window", [(5.0, 5.0), (10.0, 0.0), (0.0, float("nan")), ("a", "b")])
def test_invalid_window_rejected(window):
    with pytest.raises(InvalidInputError, match="window"):
        to_rgb_uint8(np.arange(16, dtype=np.float32).reshape(4, 4), window=window)


def test_complex_dtype_rejected():
    with pytest.raises(InvalidInputError, match="dtype"):
        to_rgb_uint8(np.zeros((4, 4), dtype=np.complex64))


# ----------------------------------------------------------------------------------------------------------------------
# Letterbox and clip_input


@pytest.mark.parametrize(
    ("shape", "side", "pad_top", "pad_left"),
    [((300, 500), 500, 100, 0), ((500, 300), 500, 0, 100), ((301, 500), 500, 99, 0), ((7, 7), 7, 0, 0)],
)
def test_letterbox_centres_image(shape, side, pad_top, pad_left):
    letterbox = Letterbox.for_shape(*shape)
    assert letterbox.side == side
    assert letterbox.pad_top == pad_top
    assert letterbox.pad_left == pad_left
    assert letterbox.original_hw == shape


def test_clip_input_shape_and_dtype():
    rgb = np.zeros((300, 500, 3), dtype=np.uint8)
    tensor, letterbox = clip_input(rgb, MEAN, STD)
    assert tuple(tensor.shape) == (1, 3, 224, 224)
    assert tensor.dtype == torch.float32
    assert letterbox == Letterbox.for_shape(300, 500, 224)


def test_clip_input_padding_is_zero():
    rgb = np.full((300, 500, 3), 255, dtype=np.uint8)
    tensor, _ = clip_input(rgb, MEAN, STD)
    # The 100-row top padding covers grid rows 0..44.8; the bicubic kernel (4 grid pixels wide when shrinking)
    # blends image into the last rows before the edge, so check rows 0..39 and the same at the bottom.
    assert float(tensor[0, :, :40, :].abs().max()) < 1e-5
    assert float(tensor[0, :, -40:, :].abs().max()) < 1e-5


def test_clip_input_square_224_is_only_normalised():
    rgb = np.random.RandomState(1).randint(0, 256, size=(224, 224, 3)).astype(np.uint8)
    tensor, _ = clip_input(rgb, MEAN, STD)
    scaled = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
    expected = (scaled - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(tensor[0], expected, atol=1e-6)


def test_clip_input_rejects_gray():
    with pytest.raises(InvalidInputError, match="to_rgb_uint8"):
        clip_input(np.zeros((10, 10), dtype=np.uint8), MEAN, STD)


def _image_area_map(letterbox: Letterbox) -> np.ndarray:
    """Return a size x size map that is 1 on grid pixels whose centres lie inside the image area, else 0.

    Along an axis where the image area is thinner than one grid pixel, the grid pixel holding the area's centre
    counts as inside.
    """
    height, width = letterbox.original_hw
    centres = np.arange(letterbox.size) + 0.5
    scale = letterbox.scale
    axes = []
    for pad, length in ((letterbox.pad_top, height), (letterbox.pad_left, width)):
        inside = (centres >= pad * scale) & (centres <= (pad + length) * scale)
        if not inside.any():
            inside[min(int((pad + length / 2) * scale), letterbox.size - 1)] = True
        axes.append(inside)
    return np.outer(axes[0], axes[1]).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_map_inside_image_maps_to_ones(shape):
    letterbox = Letterbox.for_shape(*shape)
    back = letterbox.map_to_original(_image_area_map(letterbox))
    assert back.shape == shape
    assert back.dtype == np.float32
    assert np.all(back == 1.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_map_on_padding_maps_to_zeros(shape):
    letterbox = Letterbox.for_shape(*shape)
    back = letterbox.map_to_original(1.0 - _image_area_map(letterbox))
    assert np.all(back == 0.0)


def test_map_of_square_224_image_is_identity():
    square = np.random.RandomState(2).rand(224, 224)
    back = Letterbox.for_shape(224, 224).map_to_original(square)
    assert np.allclose(back, square, atol=1e-6)


def test_map_to_original_rejects_wrong_size():
    with pytest.raises(InvalidInputError, match="224x224"):
        Letterbox.for_shape(300, 500).map_to_original(np.zeros((100, 100)))


@pytest.mark.parametrize("shape", SHAPES)
def test_marker_round_trip(shape):
    """A bright pixel goes through clip_input and back with map_to_original to where it started.

    The round trip is exact when the image is enlarged. A shrunk image's single pixels are finer than the 224 grid,
    so there the tolerance is one grid pixel in original pixels (side / 224).
    """
    height, width = shape
    background = np.round(np.array(MEAN) * 255).astype(np.uint8)  # 0 after normalising, like the padding
    tolerance = 0 if max(shape) <= 224 else math.floor(max(shape) / 224)
    random = np.random.RandomState(height * width)
    for _ in range(5):
        row, column = int(random.randint(height)), int(random.randint(width))
        rgb = np.empty((height, width, 3), dtype=np.uint8)
        rgb[:] = background
        rgb[row, column] = 255
        tensor, letterbox = clip_input(rgb, MEAN, STD)
        back = letterbox.map_to_original(tensor[0, 0].numpy())
        found_row, found_column = np.unravel_index(int(back.argmax()), back.shape)
        assert abs(int(found_row) - row) <= tolerance, (row, column, found_row, found_column)
        assert abs(int(found_column) - column) <= tolerance, (row, column, found_row, found_column)


# ----------------------------------------------------------------------------------------------------------------------
# Real images


def _real_image_paths(data_folder) -> list:
    paths = []
    for data_set in ("breast_ultrasound", "brain_mri", "chest_xray"):
        paths.extend(sorted((data_folder / data_set / "images").iterdir()))
    return paths


def test_real_images_prepare_and_map_back(shared_data):
    from MedCLIPSAMLib.io import read_image

    paths = _real_image_paths(shared_data)
    assert paths
    for path in paths[:12]:
        image = read_image(path)
        rgb = to_rgb_uint8(image)
        assert rgb.shape == image.shape[:2] + (3,), path.name
        assert rgb.dtype == np.uint8, path.name
        tensor, letterbox = clip_input(rgb, MEAN, STD)
        assert tuple(tensor.shape) == (1, 3, 224, 224), path.name
        assert bool(torch.isfinite(tensor).all()), path.name
        back = letterbox.map_to_original(_image_area_map(letterbox))
        assert np.all(back == 1.0), path.name


def test_ct_slice_windowing_keeps_order(shared_data):
    from MedCLIPSAMLib.io import read_image

    slice_path = sorted((shared_data / "dicom_series").glob("*/*"))[0]
    image = read_image(slice_path)
    assert image.dtype != np.uint8
    rgb = to_rgb_uint8(image)
    values = image.astype(np.float64).ravel()
    grays = rgb[:, :, 0].astype(np.int64).ravel()
    order = np.argsort(values, kind="stable")
    assert int(grays.min()) == 0
    assert int(grays.max()) == 255
    assert np.all(np.diff(grays[order]) >= 0)  # windowing is monotonic: brighter tissue never gets darker
