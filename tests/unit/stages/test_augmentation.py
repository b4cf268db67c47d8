"""Augmentation as one projective transform: the matrix algebra, checked with numpy (no
TensorFlow, no training) against transforms whose result is known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.train import (
    UNIFORMS_PER_IMAGE,
    Augmentation,
    compose_transforms,
    draw_transform_params,
)

IDENTITY = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def transform(h: int, w: int, **kw: float) -> np.ndarray:
    """The (8,) parameters for one image; angles in degrees, as the config gives them."""
    p = {"theta": 0.0, "dx": 0.0, "dy": 0.0, "shear": 0.0, "zx": 1.0, "zy": 1.0, "fx": 1.0}
    p |= {"fy": 1.0} | kw
    p["theta"], p["shear"] = math.radians(p["theta"]), math.radians(p["shear"])
    args = [np.array([p[k]]) for k in ("theta", "dx", "dy", "shear", "zx", "zy", "fx", "fy")]
    return compose_transforms(np, *args, h, w)[0]


def apply(image: np.ndarray, t: np.ndarray) -> np.ndarray:
    """What ImageProjectiveTransformV3 does for sample points that land on pixels: output (x, y)
    takes input (a0 x + a1 y + a2, a3 x + a4 y + a5); outside the image -> -1."""
    h, w = image.shape
    out = np.full_like(image, -1.0)
    for y in range(h):
        for x in range(w):
            xi, yi = t[0] * x + t[1] * y + t[2], t[3] * x + t[4] * y + t[5]
            assert abs(xi - round(xi)) < 1e-9 and abs(yi - round(yi)) < 1e-9, "off the grid"
            xi, yi = round(xi), round(yi)
            if 0 <= xi < w and 0 <= yi < h:
                out[y, x] = image[yi, xi]
    return out


IMAGE = np.arange(5 * 7, dtype=np.float64).reshape(5, 7)  # 5 rows, 7 columns: not square


def test_no_transform_is_the_identity():
    assert transform(5, 7).tolist() == IDENTITY
    assert (apply(IMAGE, transform(5, 7)) == IMAGE).all()


def test_a_pure_shift_moves_the_content_by_whole_pixels():
    t = transform(5, 7, dx=2, dy=-1)
    assert t.tolist() == [1, 0, 2, 0, 1, -1, 0, 0]
    out = apply(IMAGE, t)
    # output (x, y) shows input (x + 2, y - 1): the content moves 2 left and 1 down
    assert (out[1:, :5] == IMAGE[:-1, 2:]).all()
    assert (out[0] == -1).all() and (out[:, 5:] == -1).all()


def test_flips_mirror_about_the_centre():
    assert (apply(IMAGE, transform(5, 7, fx=-1)) == IMAGE[:, ::-1]).all()
    assert (apply(IMAGE, transform(5, 7, fy=-1)) == IMAGE[::-1, :]).all()
    assert (apply(IMAGE, transform(5, 7, fx=-1, fy=-1)) == IMAGE[::-1, ::-1]).all()


def test_a_flip_applies_after_the_shift_as_in_image_data_generator():
    shifted = apply(IMAGE, transform(5, 7, dx=2))
    assert (apply(IMAGE, transform(5, 7, dx=2, fx=-1)) == shifted[:, ::-1]).all()


def test_rotation_by_90_degrees_on_a_square_image_is_a_quarter_turn():
    square = np.arange(25, dtype=np.float64).reshape(5, 5)
    t = np.round(transform(5, 5, theta=90), 12)
    # positive angles turn counter-clockwise on screen, as ImageDataGenerator's do
    assert (apply(square, t) == np.rot90(square, k=1)).all()
    assert (apply(square, np.round(transform(5, 5, theta=-90), 12)) == np.rot90(square, -1)).all()


def test_zoom_scales_sample_points_about_the_centre():
    t = transform(5, 7, zx=2.0, zy=0.5)
    cx, cy = 3.0, 2.0
    for x, y in ((0, 0), (6, 4), (3, 2), (1, 3)):
        xi, yi = t[0] * x + t[1] * y + t[2], t[3] * x + t[4] * y + t[5]
        assert (xi, yi) == pytest.approx((cx + 2.0 * (x - cx), cy + 0.5 * (y - cy)))


def test_shear_and_rotation_compose_as_image_data_generator_s_matrices():
    theta, shear = math.radians(20), math.radians(11)
    rot = np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0]])
    rot = np.vstack([rot, [0, 0, 1]])
    shift = np.array([[1, 0, 3.5], [0, 1, -2.0], [0, 0, 1]])
    sh = np.array([[1, -math.sin(shear), 0], [0, math.cos(shear), 0], [0, 0, 1]])
    zoom = np.diag([1.1, 0.9, 1])
    flip = np.diag([-1, 1, 1])
    centre = np.array([[1, 0, 3.0], [0, 1, 2.0], [0, 0, 1]])
    expected = centre @ rot @ shift @ sh @ zoom @ flip @ np.linalg.inv(centre)
    t = transform(5, 7, theta=20, dx=3.5, dy=-2.0, shear=11, zx=1.1, zy=0.9, fx=-1)
    assert t[:6] == pytest.approx(expected[:2].ravel())
    assert t[6:].tolist() == [0, 0]


def test_the_draws_span_the_configured_ranges():
    a = Augmentation(
        rotation_range=20,
        width_shift_range=0.25,
        height_shift_range=0.1,
        shear_range=10,
        zoom_range=0.2,
        horizontal_flip=True,
    )
    lo = np.zeros((1, UNIFORMS_PER_IMAGE))
    hi = np.full((1, UNIFORMS_PER_IMAGE), np.nextafter(1.0, 0.0))
    theta, dx, dy, shear, zx, zy, fx, fy = (v[0] for v in draw_transform_params(np, lo, a, 8, 16))
    assert (theta, dx, dy, shear) == pytest.approx(
        (-math.radians(20), -4.0, -0.8, -math.radians(10))
    )
    assert (zx, zy, fx, fy) == pytest.approx((0.8, 0.8, -1.0, 1.0))
    theta, dx, dy, shear, zx, zy, fx, fy = (v[0] for v in draw_transform_params(np, hi, a, 8, 16))
    assert (theta, dx, dy, shear) == pytest.approx((math.radians(20), 4.0, 0.8, math.radians(10)))
    assert (zx, zy, fx, fy) == pytest.approx((1.2, 1.2, 1.0, 1.0))  # vertical_flip is off


def test_a_centred_draw_is_the_identity_and_flips_come_half_the_time():
    a = Augmentation(rotation_range=30, zoom_range=0.3, horizontal_flip=True, vertical_flip=True)
    mid = np.full((1, UNIFORMS_PER_IMAGE), 0.5)
    assert compose_transforms(np, *draw_transform_params(np, mid, a, 8, 8), 8, 8)[0].tolist() == (
        IDENTITY
    )
    u = np.random.default_rng(0).random((10_000, UNIFORMS_PER_IMAGE))
    _, _, _, _, _, _, fx, fy = draw_transform_params(np, u, a, 8, 8)
    assert set(np.unique(fx)) == set(np.unique(fy)) == {-1.0, 1.0}
    assert 0.48 < (fx < 0).mean() < 0.52 and 0.48 < (fy < 0).mean() < 0.52


def test_fill_mode_and_cval_alone_are_no_augmentation():
    assert not Augmentation(fill_mode="constant", cval=0.5).active
    assert Augmentation(vertical_flip=True).active
    assert Augmentation(zoom_range=0.1).active


@pytest.mark.parametrize(
    "params",
    [
        {"augmentation": {"cval": float("nan")}},
        {"augmentation": {"cval": float("inf")}},
        {"augmentation": {"rotation_range": 181}},
        {"augmentation": {"width_shift_range": 1.0}},
        {"augmentation": {"brightness_range": [0.5, 1.5]}},
        {"seed": -1},
        {"seed": 2**32},
    ],
)
def test_values_the_training_could_not_use_are_config_errors(params):
    """Refused when the config is validated, never a crash inside the train stage."""
    from pydantic import ValidationError

    from stages.train import TrainParams

    with pytest.raises(ValidationError):
        TrainParams.model_validate(params)
