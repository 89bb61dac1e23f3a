"""Reorientation and resampling: exact inverses, exact geometry (MoMESegmentationLib.io.geometry)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from MoMESegmentationLib.io.geometry import (
    canonicalize,
    orientation_codes,
    resample_back,
    resample_to_grid,
    resample_to_spacing,
    restore_from_canonical,
)
from MoMESegmentationLib.io.volume import Volume

FAST = settings(max_examples=25, deadline=None)


def random_rotation(seed: int, oblique: float) -> np.ndarray:
    """An orthonormal matrix (proper or not): axis permutation and flips, tilted by up to `oblique` rad."""
    rng = np.random.default_rng(seed)
    base = np.eye(3)[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], size=3)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-oblique, oblique)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    tilt = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    return tilt @ base


@st.composite
def volumes(draw, max_size: int = 16, dtype=np.float32) -> Volume:
    shape = tuple(draw(st.integers(2, max_size)) for _ in range(3))
    spacing = [draw(st.floats(0.3, 4.0)) for _ in range(3)]
    origin = [draw(st.floats(-300, 300)) for _ in range(3)]
    seed = draw(st.integers(0, 2**31 - 1))
    direction = random_rotation(seed, oblique=draw(st.sampled_from([0.0, 0.3, 0.7])))
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        array = rng.integers(0, 6, size=shape).astype(dtype)
    else:
        array = rng.normal(size=shape).astype(dtype)
    return Volume(array, spacing, origin, direction, name="random")


# ----------------------------------------------------------------------------- canonicalize
@pytest.mark.parametrize(
    "direction, expected_codes",
    [
        (np.eye(3), "LPS"),
        (np.diag([-1.0, -1.0, 1.0]), "RAS"),
        (np.array([[0, 0, 1.0], [-1.0, 0, 0], [0, -1.0, 0]]), "AIL"),
    ],
)
def test_orientation_codes_and_canonical_axes(direction, expected_codes):
    volume = Volume(np.zeros((2, 3, 4)), direction=direction)
    assert orientation_codes(volume) == expected_codes
    canonical, _ = canonicalize(volume, "RAS")
    assert orientation_codes(canonical) == "RAS"
    np.testing.assert_allclose(canonical.direction, np.diag([-1.0, -1.0, 1.0]), atol=1e-12)


def test_canonicalize_matches_monai_orientation():
    pytest.importorskip("monai")
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    volume = Volume(
        np.arange(60, dtype=np.float32).reshape(3, 4, 5),
        [1.0, 2.0, 3.0],
        [5.0, 6.0, 7.0],
        random_rotation(3, oblique=0.2),
    )
    canonical, _ = canonicalize(volume, "RAS")
    tensor = MetaTensor(torch.from_numpy(volume.array)[None], affine=torch.as_tensor(volume.affine_ras))
    expected = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(tensor)
    np.testing.assert_array_equal(expected[0].numpy(), canonical.array)
    np.testing.assert_allclose(expected.affine.numpy(), canonical.affine_ras, atol=1e-6)


@FAST
@given(volumes(), st.sampled_from(["RAS", "LPS", "PIR"]))
def test_canonicalize_restore_is_bit_exact_and_keeps_physical_positions(volume, axcodes):
    canonical, record = canonicalize(volume, axcodes)
    assert orientation_codes(canonical) == axcodes
    assert canonical.array.flags.c_contiguous
    np.testing.assert_array_equal(restore_from_canonical(canonical.array, record), volume.array)

    # every voxel keeps its physical position: map all canonical indices back to the original grid
    index = np.stack(np.meshgrid(*[np.arange(n) for n in canonical.shape], indexing="ij"), axis=-1)
    original_index = volume.physical_to_index(canonical.index_to_physical(index))
    rounded = np.round(original_index).astype(int)
    np.testing.assert_allclose(original_index, rounded, atol=1e-6)
    np.testing.assert_array_equal(volume.array[tuple(np.moveaxis(rounded, -1, 0))], canonical.array)


@FAST
@given(volumes(max_size=8), st.integers(1, 3))
def test_restore_accepts_leading_channels_numpy_and_torch(volume, channels):
    canonical, record = canonicalize(volume)
    stacked = np.stack([canonical.array * c for c in range(channels)])
    restored = restore_from_canonical(stacked, record)
    assert restored.shape == (channels, *volume.shape)
    np.testing.assert_array_equal(restored[-1], volume.array * (channels - 1))
    tensor = torch.from_numpy(stacked)[None]
    restored_t = restore_from_canonical(tensor, record)
    assert isinstance(restored_t, torch.Tensor) and restored_t.shape == (1, channels, *volume.shape)
    np.testing.assert_array_equal(restored_t[0].numpy(), restored)


def test_restore_rejects_wrong_shape_and_bad_axcodes():
    _, record = canonicalize(Volume(np.zeros((2, 3, 4)), direction=np.diag([1.0, -1.0, 1.0])))
    with pytest.raises(ValueError, match="canonical grid"):
        restore_from_canonical(np.zeros((2, 3, 5)), record)
    with pytest.raises(ValueError, match="axcodes"):
        canonicalize(Volume(np.zeros((2, 3, 4))), "RAR")


# ----------------------------------------------------------------------------- resample
@FAST
@given(volumes(dtype=np.uint8), st.tuples(*[st.floats(0.5, 3.0)] * 3))
def test_resample_then_back_restores_grid_and_labels(volume, spacing):
    resampled, record = resample_to_spacing(volume, spacing, mode="nearest")
    assert resampled.array.dtype == np.uint8
    assert resampled.shape == record.shape
    np.testing.assert_allclose(resampled.direction, volume.direction)
    # both grids cover the same box: corner (-1/2, -1/2, -1/2) coincides
    np.testing.assert_allclose(
        resampled.index_to_physical(np.full(3, -0.5)), volume.index_to_physical(np.full(3, -0.5)), atol=1e-6
    )
    np.testing.assert_allclose(
        np.multiply(resampled.shape, resampled.spacing), np.multiply(volume.shape, volume.spacing), rtol=1e-9
    )

    back = resample_back(resampled.array, record, mode="nearest")
    assert back.shape == volume.shape and back.dtype == volume.array.dtype
    ratio = resampled.spacing / volume.spacing
    if np.all(ratio <= 1.0):
        # upsampling loses nothing: nearest there and back is the identity
        np.testing.assert_array_equal(back, volume.array)
    # each voxel gets a label found within half a resampled voxel plus half an original voxel
    radius = np.ceil(0.5 * np.maximum(ratio, 1.0) + 0.5 - 1e-9).astype(int)
    padded = np.pad(volume.array.astype(int), [(r, r) for r in radius], constant_values=-1)
    hits = np.zeros(volume.shape, dtype=bool)
    for offset in np.ndindex(*(2 * radius + 1)):
        window = padded[tuple(slice(o, o + n) for o, n in zip(offset, volume.shape))]
        hits |= window == back
    assert hits.all()


@FAST
@given(volumes(max_size=12), st.tuples(*[st.floats(0.5, 3.0)] * 3))
def test_resample_linear_back_on_torch_with_channels(volume, spacing):
    resampled, record = resample_to_spacing(volume, spacing, mode="linear")
    probabilities = torch.from_numpy(np.stack([resampled.array, -resampled.array]))
    back = resample_back(probabilities, record, mode="linear")
    assert isinstance(back, torch.Tensor)
    assert tuple(back.shape) == (2, *volume.shape)
    torch.testing.assert_close(back[0], -back[1])
    # a constant field stays constant (no leakage at the borders)
    constant = resample_back(np.full(record.shape, 0.25, dtype=np.float32), record)
    np.testing.assert_allclose(constant, 0.25, rtol=1e-6)


def test_resample_integer_factor_is_exact():
    volume = Volume(np.arange(4 * 6 * 2, dtype=np.int16).reshape(4, 6, 2), [2.0, 2.0, 2.0])
    fine, record = resample_to_spacing(volume, 1.0, mode="nearest")
    assert fine.shape == (8, 12, 4)
    np.testing.assert_array_equal(fine.array, volume.array.repeat(2, 0).repeat(2, 1).repeat(2, 2))
    np.testing.assert_allclose(fine.origin, [-0.5, -0.5, -0.5])
    np.testing.assert_array_equal(resample_back(fine.array, record, "nearest"), volume.array)
    with pytest.raises(ValueError, match="mode"):
        resample_to_spacing(volume, 1.0, mode="cubic")


def test_resample_to_grid_moves_a_point_between_oblique_grids():
    source = Volume(
        np.zeros((20, 18, 16), dtype=np.uint8),
        [1.0, 1.2, 1.5],
        [10.0, -5.0, 3.0],
        random_rotation(7, oblique=0.5),
    )
    index = np.array([9, 8, 7])
    source.array[8:11, 7:10, 6:9] = 5  # a 3x3x3 blob centred on `index`
    point = source.index_to_physical(index)
    rotation = random_rotation(11, oblique=0.5)
    spacing = np.array([0.9, 1.1, 1.7])
    target = Volume(
        np.zeros((24, 20, 14), dtype=np.uint8),
        spacing,
        point - rotation @ (spacing * np.array([11.3, 9.6, 6.2])),
        rotation,
    )
    moved = resample_to_grid(source, target, mode="nearest")
    assert moved.same_grid(target) and moved.array.dtype == np.uint8
    found = np.argwhere(moved.array == 5)
    assert len(found) >= 1
    centroid = target.index_to_physical(found.mean(axis=0))
    assert np.linalg.norm(centroid - point) <= 0.5 * target.spacing.max()
    # the blob's volume is preserved up to its boundary voxels
    assert (
        abs(len(found) * target.voxel_volume_ml - 27 * source.voxel_volume_ml)
        < 0.6 * 27 * source.voxel_volume_ml
    )
    # same as looking up the nearest source voxel of every target voxel centre
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in target.shape], indexing="ij"), axis=-1)
    nearest = np.round(source.physical_to_index(target.index_to_physical(grid))).astype(int)
    valid = np.all((nearest >= 0) & (nearest < np.array(source.shape)), axis=-1)
    expected = np.zeros(target.shape, dtype=np.uint8)
    expected[valid] = source.array[tuple(nearest[valid].T)]
    assert (expected == moved.array).mean() > 0.999  # rounding ties may differ
    # identity when the grids agree, and fill outside
    same = resample_to_grid(source, source, mode="nearest")
    np.testing.assert_array_equal(same.array, source.array)
    far = Volume(np.zeros((3, 3, 3)), origin=[1000.0, 0, 0])
    assert np.all(resample_to_grid(source, far, mode="linear", fill_value=-1.0).array == -1.0)


def test_resample_to_grid_linear_reproduces_a_linear_ramp():
    source = Volume(
        np.zeros((12, 12, 12), dtype=np.float32),
        [1.0, 1.0, 1.0],
        [0.0, 0.0, 0.0],
        random_rotation(2, oblique=0.3),
    )
    index = np.stack(np.meshgrid(*[np.arange(12)] * 3, indexing="ij"), axis=-1)
    source.array[...] = source.index_to_physical(index) @ np.array([0.5, -0.25, 1.0])
    centre = source.index_to_physical(np.full(3, 5.5))
    target = Volume(np.zeros((6, 6, 6)), [1.3, 0.8, 1.1], centre - 2.5 * np.array([1.3, 0.8, 1.1]), np.eye(3))
    result = resample_to_grid(source, target, mode="linear", fill_value=np.nan)
    expected = target.index_to_physical(
        np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"), -1)
    ) @ np.array([0.5, -0.25, 1.0])
    inside = np.isfinite(result.array)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(result.array[inside], expected[inside], atol=1e-3)


# ------------------------------------------------------------------ behaviour at the edges
def test_resampling_in_slabs_equals_one_slab():
    """The output is computed in slabs of ``chunk_voxels``; slab borders must not show."""
    rng = np.random.default_rng(3)
    volume = Volume(rng.normal(size=(9, 7, 5)).astype(np.float32), spacing=(1.0, 1.3, 2.0),
                    origin=(0.5, -1.0, 2.0), direction=np.eye(3))
    reference = Volume(np.zeros((13, 6, 4), np.float32), spacing=(0.7, 1.5, 2.2), origin=(0.0, -1.2, 1.0),
                       direction=np.eye(3))
    whole = resample_to_grid(volume, reference, "linear", fill_value=-7.0)
    for chunk in (6 * 4, 3 * 6 * 4, 5 * 6 * 4 + 1):  # one row of I per slab, three rows, five rows
        sliced = resample_to_grid(volume, reference, "linear", fill_value=-7.0, chunk_voxels=chunk)
        np.testing.assert_array_equal(sliced.array, whole.array)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_a_target_voxel_within_half_a_voxel_of_the_edge_is_sampled_and_beyond_it_filled(mode):
    """Source voxels cover index -0.5 .. n - 0.5 on each axis: inside takes the edge value, outside the fill."""
    source = np.arange(4 * 3 * 3, dtype=np.float32).reshape(4, 3, 3) + 100
    volume = Volume(source, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    # target centres along i at source indices -0.6, -0.4, 3.4, 3.6 (j = k = 1)
    positions = [-0.6, -0.4, 3.4, 3.6]
    for i_source, inside in zip(positions, [False, True, True, False]):
        reference = Volume(np.zeros((1, 1, 1), np.float32), spacing=(1.0, 1.0, 1.0),
                           origin=(i_source, 1.0, 1.0), direction=np.eye(3))
        value = float(resample_to_grid(volume, reference, mode, fill_value=-1.0).array[0, 0, 0])
        edge = source[0 if i_source < 0 else 3, 1, 1]
        assert value == (pytest.approx(edge) if inside else -1.0), (mode, i_source)


@pytest.mark.parametrize("codes", ["RA", "RASI", "RAX", "RRS", "", "LPQ"])
def test_bad_orientation_codes_are_refused_by_name(codes):
    volume = Volume(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match=repr(codes).replace("[", r"\[")):
        canonicalize(volume, codes)
