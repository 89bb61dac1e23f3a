"""Padding of scans shorter than one network window (MoMESegmentationLib.windows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from MoMESegmentationLib.windows import (
    PAD_MODES,
    apply_padding,
    pad_to_window,
    truncated_sides,
    valid_window_mask,
    window_padding,
)

sizes = st.lists(st.integers(1, 12), min_size=1, max_size=3)
flags = st.tuples(st.booleans(), st.booleans())


@st.composite
def padding_cases(draw):
    """A positive image (so that any 0 is padding), a window and truncation flags per axis."""
    shape = draw(sizes)
    window = draw(st.lists(st.integers(1, 20), min_size=len(shape), max_size=len(shape)))
    truncated = draw(st.lists(flags, min_size=len(shape), max_size=len(shape)))
    mode = draw(st.sampled_from(PAD_MODES))
    seed = draw(st.integers(0, 2**16))
    image = np.random.default_rng(seed).uniform(0.1, 1.0, size=shape).astype(np.float32)
    return image, tuple(window), tuple(truncated), mode


def _mirror_index(i: int, n: int) -> int:
    """Index of the image voxel that reflection about the first and last voxels puts at ``i``."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    j = i % period
    return j if j < n else period - j


@given(padding_cases())
def test_padded_size_spans_the_window_and_keeps_long_axes(case):
    image, window, truncated, mode = case
    padded, padding = pad_to_window(image, window, truncated, mode)
    for n, w, (before, after), m in zip(image.shape, window, padding, padded.shape):
        assert m == max(n, w)
        assert m >= w
        if n >= w:
            assert (before, after) == (0, 0)
        else:  # the deficit is split evenly, the odd voxel after
            assert before == (w - n) // 2 and after == (w - n) - before


@given(padding_cases())
def test_cropping_the_reported_padding_gives_back_the_input_exactly(case):
    image, window, truncated, mode = case
    padded, padding = pad_to_window(image, window, truncated, mode)
    inside = tuple(slice(b, m - a) for (b, a), m in zip(padding, padded.shape))
    np.testing.assert_array_equal(padded[inside], image)
    assert padded.dtype == image.dtype


@given(padding_cases())
def test_mirror_sides_reflect_the_image_and_other_sides_are_air(case):
    """Along each axis (within the unpadded range of the other axes) a reflected side holds the image
    mirrored about its first/last voxel, continued periodically however wide the padding; any other
    side holds 0 (air after the HU window)."""
    image, window, truncated, mode = case
    padded, padding = pad_to_window(image, window, truncated, mode)
    inside = [slice(b, m - a) for (b, a), m in zip(padding, padded.shape)]
    for axis, ((before, after), (cut_before, cut_after), n) in enumerate(zip(padding, truncated, image.shape)):
        box = list(inside)
        box[axis] = slice(None)
        line = np.moveaxis(padded[tuple(box)], axis, 0)
        source = np.moveaxis(image, axis, 0)
        mirror_before = mode == "mirror" and cut_before and n > 1
        mirror_after = mode == "mirror" and cut_after and n > 1
        for k in range(1, before + 1):
            expected = source[_mirror_index(-k, n)] if mirror_before else 0.0
            np.testing.assert_array_equal(line[before - k], expected, err_msg=f"axis {axis}, {k} before")
        for k in range(1, after + 1):
            expected = source[_mirror_index(n - 1 + k, n)] if mirror_after else 0.0
            np.testing.assert_array_equal(line[before + n - 1 + k], expected, err_msg=f"axis {axis}, {k} after")


def test_wide_mirror_after_air_continues_the_anatomy():
    """A cut side opposite an air side, wider than the image: the reflection repeats the image
    instead of reflecting the air padding of the other side."""
    image = np.array([1.0, 2.0, 3.0], np.float32)
    padded, padding = pad_to_window(image, (14,), ((False, True),))
    assert padding == ((5, 6),)
    np.testing.assert_array_equal(padded, [0, 0, 0, 0, 0, 1, 2, 3, 2, 1, 2, 3, 2, 1])
    padded, _ = pad_to_window(image, (14,), ((True, False),))
    np.testing.assert_array_equal(padded, [2, 1, 2, 3, 2, 1, 2, 3, 0, 0, 0, 0, 0, 0])


@given(padding_cases())
def test_constant_mode_pads_with_air_only(case):
    image, window, truncated, _ = case
    padded, padding = pad_to_window(image, window, truncated, "constant")
    inside = tuple(slice(b, m - a) for (b, a), m in zip(padding, padded.shape))
    outside = np.ones(padded.shape, bool)
    outside[inside] = False
    assert (padded[outside] == 0).all()
    assert (padded[~outside] > 0).all()


def test_single_voxel_axis_cannot_be_reflected_and_gets_air():
    image = np.full((1, 4), 0.5, np.float32)
    padded, padding = pad_to_window(image, (5, 4), ((True, True), (False, False)))
    assert padding == ((2, 2), (0, 0))
    np.testing.assert_array_equal(padded[:, 0], [0, 0, 0.5, 0, 0])


@given(padding_cases(), st.sampled_from([0.3, 0.5, 0.8]))
def test_image_and_label_padded_with_one_plan_stay_aligned(case, threshold):
    """A label that is a function of the image (0 where the image is air) stays that function."""
    image, window, truncated, mode = case
    label = np.where(image > threshold, 3, 0).astype(np.uint8)
    plan = window_padding(image.shape, window, truncated, mode)
    padded_image = apply_padding(image, plan)
    padded_label = apply_padding(label, plan)
    assert padded_label.dtype == np.uint8
    np.testing.assert_array_equal(padded_label, np.where(padded_image > threshold, 3, 0))


def test_apply_padding_pads_the_trailing_spatial_axes_and_fills_valid_masks_with_zeros():
    image = np.random.default_rng(0).uniform(0.1, 1, size=(2, 3, 4, 5)).astype(np.float32)
    plan = window_padding(image.shape[1:], (3, 8, 5), ((False, False), (True, True), (False, False)))
    padded = apply_padding(image, plan)
    assert padded.shape == (2, 3, 8, 5)
    np.testing.assert_array_equal(padded[:, :, 2:6], image)
    np.testing.assert_array_equal(padded[:, :, 1], image[:, :, 1])  # reflected about index 0
    valid = apply_padding(np.ones(image.shape, np.float32), tuple(((b, False), (a, False)) for (b, _), (a, _) in plan))
    assert valid[:, :, 2:6].all() and not valid[:, :, :2].any() and not valid[:, :, 6:].any()


def _slab_body(shape=(20, 30, 24), top_cut=True):
    """A body ellipsoid whose centre sits on the top slice of axis 2 (cut there, ends inside below)."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    centre = (shape[0] / 2, shape[1] / 2, shape[2] - 1 if top_cut else shape[2] / 2)
    radii = (8.0, 11.0, 14.0 if top_cut else 8.0)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) < 1.0


def test_body_cut_at_the_top_slice_is_truncated_there_only():
    body = _slab_body()
    assert truncated_sides(body) == ((False, False), (False, False), (False, True))
    assert truncated_sides(_slab_body(top_cut=False)) == ((False, False),) * 3


def test_a_thin_table_touching_the_edges_is_not_a_cut():
    body = _slab_body()
    body[:, 2, :] = True  # a one-voxel table across the whole field of view: touches axes 0 and 2 at both ends
    assert truncated_sides(body) == ((False, False), (False, False), (False, True))
    body[:, 2:10, :] = True  # a slab of tissue that large is a cut
    sides = truncated_sides(body)
    assert sides[0] == (True, True) and sides[2] == (True, True)


def test_truncated_sides_of_an_empty_mask_are_not_cuts():
    assert truncated_sides(np.zeros((4, 5, 6), bool)) == ((False, False),) * 3


def test_mirror_padding_follows_the_cut_in_a_synthetic_slab():
    """The engine's rule end to end: a slab cut at the top is mirrored on top and gets air below."""
    body = _slab_body()
    image = np.where(body, 0.6, 0.0).astype(np.float32)
    padded, padding = pad_to_window(image, (20, 30, 40), truncated_sides(body))
    assert padding == ((0, 0), (0, 0), (8, 8))
    assert (padded[..., :8] == 0).all()
    np.testing.assert_array_equal(padded[..., 32:], image[..., -2:-10:-1])
    assert padded[..., 32:].any()


@st.composite
def window_boxes(draw):
    shape = draw(st.lists(st.integers(2, 10), min_size=3, max_size=3))
    window = [draw(st.integers(1, n)) for n in shape]
    inside = []
    for n in shape:
        start = draw(st.integers(0, n - 1))
        inside.append(slice(start, draw(st.integers(start + 1, n))))
    starts = draw(st.lists(st.lists(st.integers(0, 10), min_size=3, max_size=3), min_size=1, max_size=4))
    coords = [[slice(i, i + 1), slice(None)] + [slice(min(s, n - w), min(s, n - w) + w)
                                                 for s, n, w in zip(start, shape, window)]
              for i, start in enumerate(starts)]
    return tuple(shape), coords, tuple(inside)


@given(window_boxes())
def test_valid_window_mask_is_the_indicator_of_the_box(case):
    shape, coords, inside = case
    indicator = torch.zeros(shape, dtype=torch.bool)
    indicator[inside] = True
    mask = valid_window_mask(coords, inside)
    assert mask.dtype == torch.bool and mask.shape == (len(coords), 1, *[c.stop - c.start for c in coords[0][2:]])
    for i, c in enumerate(coords):
        assert torch.equal(mask[i, 0], indicator[tuple(c[2:])])


def test_valid_window_mask_with_monai_sliding_window_coordinates():
    """Stitched over MONAI's windows, the masks rebuild the indicator of the unpadded box."""
    from monai.inferers import sliding_window_inference

    image = np.random.default_rng(1).uniform(0.1, 1, size=(30, 12, 7)).astype(np.float32)
    padded, padding = pad_to_window(image, (16, 16, 16), ((True, True),) * 3)
    inside = tuple(slice(b, m - a) for (b, a), m in zip(padding, padded.shape))
    seen = []

    def predictor(window, coords):
        seen.extend(coords)
        return valid_window_mask(coords, inside, window.device).float()

    out = sliding_window_inference(torch.from_numpy(padded)[None, None], (16, 16, 16), 2, predictor,
                                   overlap=0.25, with_coord=True)
    indicator = torch.zeros(padded.shape)
    indicator[inside] = 1
    assert len(seen) > 1
    torch.testing.assert_close(out[0, 0], indicator)


def test_bad_mode_and_mismatched_axes_are_rejected():
    with pytest.raises(ValueError, match="pad mode"):
        window_padding((4, 4, 4), (8, 8, 8), ((True, True),) * 3, mode="reflect")
    with pytest.raises(ValueError, match="pad mode"):
        pad_to_window(np.zeros((4, 4, 4)), (8, 8, 8), ((True, True),) * 3, mode="edge")
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        window_padding((4, 4), (8, 8, 8), ((True, True),) * 3)
