"""Volume files: bit-exact voxels, exact geometry, atomic writes (MoMESegmentationLib.io.readers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MoMESegmentationLib.errors import MoMEError
from MoMESegmentationLib.io.geometry import canonicalize, restore_from_canonical
from MoMESegmentationLib.io.readers import read_volume, write_labelmap, write_volume
from MoMESegmentationLib.io.volume import Volume

REPO_ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"]
# NIfTI stores the affine as float32; NRRD and MetaImage keep doubles.
GEOMETRY_ATOL = {".nii": 1e-4, ".nii.gz": 1e-4}
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def random_rotation(seed: int) -> np.ndarray:
    """Any orthonormal matrix (proper or improper): oblique, flipped, permuted."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.diag(r))[None, :]


@st.composite
def volumes(draw) -> Volume:
    shape = tuple(draw(st.integers(2, 13)) for _ in range(3))
    dtype = draw(st.sampled_from([np.int16, np.uint8, np.float32, np.float64, np.int32]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(max(info.min, -3000), min(info.max, 3000), size=shape, endpoint=True).astype(
            dtype
        )
    else:
        array = (rng.normal(size=shape) * 1000).astype(dtype)
    spacing = [draw(st.floats(0.25, 5.0)) for _ in range(3)]
    origin = [draw(st.floats(-400, 400)) for _ in range(3)]
    return Volume(array, spacing, origin, random_rotation(seed), name="random")


def assert_same_volume(read: Volume, written: Volume, suffix: str) -> None:
    assert read.array.dtype == written.array.dtype
    np.testing.assert_array_equal(read.array, written.array)
    atol = GEOMETRY_ATOL.get(suffix, 1e-9)
    np.testing.assert_allclose(read.spacing, written.spacing, rtol=1e-6, atol=atol)
    np.testing.assert_allclose(read.origin, written.origin, atol=atol)
    np.testing.assert_allclose(read.direction, written.direction, atol=atol)


@FAST
@given(volume=volumes(), suffix=st.sampled_from(SUFFIXES))
def test_write_read_round_trip_is_exact(tmp_path, volume, suffix):
    path = tmp_path / f"scan{suffix}"
    assert write_volume(volume, path) == path
    read = read_volume(path)
    assert_same_volume(read, volume, suffix)
    assert read.name == path.name


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_known_geometry_in_lps(tmp_path, suffix):
    """A volume whose first axis points right (-x in LPS): NIfTI must store +x spacing in RAS."""
    volume = Volume(
        np.arange(24, dtype=np.int16).reshape(2, 3, 4),
        [0.5, 1.0, 2.0],
        [10.0, 20.0, 30.0],
        np.diag([-1.0, 1.0, 1.0]),
    )
    write_volume(volume, tmp_path / f"v{suffix}")
    read = read_volume(tmp_path / f"v{suffix}")
    assert_same_volume(read, volume, suffix)
    np.testing.assert_allclose(
        read.index_to_physical([1, 2, 3]), [10.0 - 0.5, 20.0 + 2.0, 30.0 + 6.0], atol=1e-5
    )
    if suffix.startswith(".nii"):
        import nibabel as nib

        affine = nib.load(str(tmp_path / f"v{suffix}")).affine
        np.testing.assert_allclose(affine[:3, 3], [-10.0, -20.0, 30.0], atol=1e-5)
        np.testing.assert_allclose(np.diag(affine)[:3], [0.5, -1.0, 2.0], atol=1e-6)


def test_nifti_and_nrrd_agree_with_simpleitk(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    volume = Volume(
        np.random.default_rng(0).integers(-5, 5, (4, 5, 6)).astype(np.int16),
        [0.7, 0.9, 1.3],
        [-12.5, 3.25, 40.0],
        random_rotation(4),
    )
    for suffix in (".nii.gz", ".nrrd"):
        write_volume(volume, tmp_path / f"v{suffix}")
        image = sitk.ReadImage(str(tmp_path / f"v{suffix}"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), volume.array)
        np.testing.assert_allclose(image.GetOrigin(), volume.origin, atol=1e-4)
        np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), volume.direction, atol=1e-4)


@FAST
@given(volume=volumes(), suffix=st.sampled_from([".nii.gz", ".nrrd", ".mha"]), data=st.data())
def test_label_painted_at_a_physical_point_stays_there(tmp_path, volume, suffix, data):
    index = np.array([data.draw(st.integers(0, n - 1)) for n in volume.shape])
    point = volume.index_to_physical(index)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[tuple(index)] = 7
    path = tmp_path / f"labels{suffix}"
    write_labelmap(labels, volume, path)
    read = read_volume(path)
    assert read.same_grid(volume, atol=1e-4)

    canonical, record = canonicalize(read, "RAS")
    found = np.argwhere(canonical.array == 7)
    assert len(found) == 1
    distance = np.abs(canonical.physical_to_index(point) - found[0])
    assert np.all(distance < 0.5)
    restored = restore_from_canonical(canonical.array, record)
    np.testing.assert_array_equal(restored, labels)


@pytest.mark.parametrize(
    "labels, expected_dtype",
    [
        (np.array([0, 1, 2, 255]), np.uint8),
        (np.array([0, 1, 300, 2]), np.uint16),
        (np.array([-1, 0, 5, 2]), np.int16),
        (np.array([0.0, 1.0, 2.0, 3.0]), np.uint8),
        (np.array([True, False, True, True]), np.uint8),
    ],
)
def test_write_labelmap_picks_integer_dtype_on_reference_grid(tmp_path, labels, expected_dtype):
    reference = Volume(
        np.zeros((2, 2, 1 + 1), dtype=np.float32), [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], random_rotation(1)
    )
    write_labelmap(labels.reshape(2, 2, 1).repeat(2, axis=2), reference, tmp_path / "l.nii.gz")
    read = read_volume(tmp_path / "l.nii.gz")
    assert read.array.dtype == expected_dtype
    assert read.same_grid(reference, atol=1e-4)
    np.testing.assert_array_equal(read.array[:, :, 0].reshape(-1), labels.astype(expected_dtype))


def test_write_labelmap_rejects_bad_labels(tmp_path):
    reference = Volume(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="shape"):
        write_labelmap(np.zeros((2, 3, 5), dtype=np.uint8), reference, tmp_path / "l.nrrd")
    with pytest.raises(ValueError, match="whole numbers"):
        write_labelmap(np.full((2, 3, 4), 0.5), reference, tmp_path / "l.nrrd")
    assert not list(tmp_path.iterdir())


def test_write_into_missing_folder_raises(tmp_path):
    volume = Volume(np.zeros((2, 3, 4), dtype=np.int16))
    with pytest.raises(MoMEError, match="does not exist"):
        write_volume(volume, tmp_path / "missing" / "v.nii.gz")


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "v.nrrd"
    good = Volume(np.ones((2, 3, 4), dtype=np.int16))
    write_volume(good, path)
    before = path.read_bytes()
    bad = Volume(np.ones((2, 3, 4), dtype=np.complex64))
    with pytest.raises(ValueError, match="dtype"):
        write_volume(bad, path)
    with pytest.raises(ValueError, match="file type"):
        write_volume(good, tmp_path / "v.png")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nrrd"]


def test_write_is_atomic_under_a_killed_writer(tmp_path):
    """A writer killed mid-way never leaves a partial file under the final name."""
    path = tmp_path / "big.nii.gz"
    script = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "import MoMESegmentationLib.io.readers as r\n"
        "import nibabel as nib\n"
        "def boom(*a, **k):\n"
        "    open(a[1], 'wb').write(b'partial')\n"
        "    import os; os._exit(3)\n"
        "nib.save = boom\n"
        "r.write_volume(r.Volume(np.zeros((4, 4, 4), np.int16)), sys.argv[1])\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, check=False)
    assert result.returncode == 3
    assert not path.exists()


def test_mhd_writes_header_and_data_side_by_side(tmp_path):
    volume = Volume(np.arange(24, dtype=np.float32).reshape(2, 3, 4), [1.0, 2.0, 3.0])
    write_volume(volume, tmp_path / "v.mhd")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "v.mhd" and names[1].startswith("v.") and len(names) == 2
    assert "ElementDataFile = " + names[1] in (tmp_path / "v.mhd").read_text()
    np.testing.assert_array_equal(read_volume(tmp_path / "v.mhd").array, volume.array)


def test_singleton_fourth_axis_is_accepted(tmp_path):
    import nibabel as nib

    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4, 1)
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])), str(tmp_path / "v.nii.gz"))
    read = read_volume(tmp_path / "v.nii.gz")
    assert read.shape == (2, 3, 4)
    np.testing.assert_allclose(read.direction, np.eye(3), atol=1e-7)
